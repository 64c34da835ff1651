"""Tool-call parsers, one module per format, found by name (`get_tool_parser("hermes")`)."""

from __future__ import annotations

from pagellm.entrypoints.openai.parser_registry import parsers_in, resolve_parser
from pagellm.entrypoints.openai.tool_parsers.base import ToolCallStream, ToolParser


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name` (or a `module:Class` path); ValueError if unknown."""
    return resolve_parser(name, __name__, ToolParser, "tool-call")


def tool_parser_names() -> list[str]:
    return sorted(parsers_in(__name__, ToolParser))


__all__ = ["ToolCallStream", "ToolParser", "get_tool_parser", "tool_parser_names"]
