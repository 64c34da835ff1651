"""One chat choice's text split into reasoning, content and tool calls, streamed or whole.

    text deltas -> ReasoningStream (reasoning_content | rest) -> ToolCallStream (content | tool calls)

Whole responses go through the same machines (`feed` everything, then `finish`), so a streamed
choice and a non-streamed one agree. Either stage is optional: reasoning needs
`--reasoning-parser`, tool calls a request with tools under `tool_choice: "auto"` and
`--tool-call-parser`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pagellm.entrypoints.openai.parsed_output import DeltaMessage, DeltaToolCall, ToolCall
from pagellm.entrypoints.openai.reasoning import ReasoningParser
from pagellm.entrypoints.openai.tool_parsers import ToolParser


@dataclass
class ParsedChoice:
    """A whole choice: what goes into `message` (fields None when empty)."""

    content: Optional[str]
    reasoning_content: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ChoiceOutputParser:
    def __init__(self, reasoning: Optional[ReasoningParser], tools: Optional[ToolParser]) -> None:
        self._reasoning = reasoning.stream() if reasoning is not None else None
        self._tools = tools.stream() if tools is not None else None
        self._reasoning_text: list[str] = []
        self._plain_content: list[str] = []  # content when there is no tool parser

    def feed(self, text: str) -> Optional[DeltaMessage]:
        """The delta to send for this piece of generated text (None: nothing to send yet)."""
        if not text:
            return None
        if self._reasoning is None:
            return self._content(text)
        return self._split(self._reasoning.feed(text))

    def finish(self) -> Optional[DeltaMessage]:
        """Flushes what the parsers held back at the end of generation."""
        out = DeltaMessage()
        if self._reasoning is not None:
            _merge(out, self._split(self._reasoning.finish()))
        if self._tools is not None:
            _merge(out, self._tools.finish())
        return None if out.is_empty() else out

    def result(self) -> ParsedChoice:
        reasoning = "".join(self._reasoning_text) or None
        if self._tools is None:
            return ParsedChoice("".join(self._plain_content) or None, reasoning)
        parsed = self._tools.result()
        return ParsedChoice(parsed.content, reasoning, parsed.tool_calls)

    @property
    def tools_called(self) -> bool:
        return self._tools is not None and self._tools.result().tools_called

    def _split(self, delta: Optional[DeltaMessage]) -> Optional[DeltaMessage]:
        if delta is None:
            return None
        out = DeltaMessage(reasoning_content=delta.reasoning_content)
        if delta.reasoning_content:
            self._reasoning_text.append(delta.reasoning_content)
        if delta.content:
            _merge(out, self._content(delta.content))
        return None if out.is_empty() else out

    def _content(self, text: str) -> Optional[DeltaMessage]:
        if self._tools is None:
            self._plain_content.append(text)
            return DeltaMessage(content=text)
        return self._tools.feed(text)


def _merge(into: DeltaMessage, delta: Optional[DeltaMessage]) -> None:
    if delta is None:
        return
    if delta.content:
        into.content = (into.content or "") + delta.content
    if delta.reasoning_content:
        into.reasoning_content = (into.reasoning_content or "") + delta.reasoning_content
    for call in delta.tool_calls:
        _merge_call(into.tool_calls, call)


def _merge_call(calls: list[DeltaToolCall], call: DeltaToolCall) -> None:
    """Appends a fragment, joining it to the previous fragment of the same call."""
    if calls and calls[-1].index == call.index and call.id is None:
        last = calls[-1].function
        last.arguments = (last.arguments or "") + (call.function.arguments or "")
        return
    calls.append(call)

