"""Qwen3 style: reasoning only when the output opens with `<think>` (leading whitespace
allowed); an output without it is all content (enable_thinking=False)."""

from pagellm.entrypoints.openai.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    names = ("qwen3",)
    starts_in_reasoning = False
