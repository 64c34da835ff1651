"""Reasoning parsers, one module per model family, found by name (`get_reasoning_parser("qwen3")`)."""

from __future__ import annotations

from pagellm.entrypoints.openai.parser_registry import parsers_in, resolve_parser
from pagellm.entrypoints.openai.reasoning.base import ReasoningParser, ReasoningStream


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name` (or a `module:Class` path); ValueError if unknown."""
    return resolve_parser(name, __name__, ReasoningParser, "reasoning")


def reasoning_parser_names() -> list[str]:
    return sorted(parsers_in(__name__, ReasoningParser))


__all__ = ["ReasoningParser", "ReasoningStream", "get_reasoning_parser", "reasoning_parser_names"]
