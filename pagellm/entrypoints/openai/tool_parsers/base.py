"""Tool-call parsers: split a model's text into OpenAI tool calls and plain content.

A parser is built per request from the tokenizer (optional) and the request's `tools`, and
gives a `ToolCallStream` per output: `feed(delta)` returns the `DeltaMessage` to send (content
fragments, tool-call fragments) or None while text is held back, `finish()` flushes what is
left at the end of generation, and `result()` is the whole message as parsed so far.
`extract(text)` parses a finished output in one go, through the same machine, so streamed
and whole results agree. Fallback rules are in `scanner.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from pagellm.entrypoints.openai.parsed_output import (DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                                                      ExtractedToolCalls, FunctionCall, ToolCall,
                                                      make_tool_call_id)
from pagellm.entrypoints.openai.tool_parsers.scanner import Event, ToolMarkupScanner


class ToolParser:
    names: ClassVar[tuple[str, ...]] = ()
    # Markers that some tokenizers mark special ([TOOL_CALLS], <|python_tag|>): the request must
    # be detokenized with skip_special_tokens=False or the parser never sees them.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None, tools: Optional[list[dict[str, Any]]] = None) -> None:
        self.tokenizer = tokenizer
        self.tools = list(tools or [])

    def new_scanner(self) -> ToolMarkupScanner:
        raise NotImplementedError

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self.new_scanner())

    def extract(self, text: str) -> ExtractedToolCalls:
        stream = self.stream()
        stream.feed(text)
        stream.finish()
        return stream.result()


class ToolCallStream:
    """Turns a scanner's events into OpenAI deltas; ids are made here, one per call."""

    def __init__(self, scanner: ToolMarkupScanner) -> None:
        self._scanner = scanner
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces

    def feed(self, delta: str) -> Optional[DeltaMessage]:
        return self._to_delta(self._scanner.feed(delta))

    def finish(self) -> Optional[DeltaMessage]:
        return self._to_delta(self._scanner.finish())

    def result(self) -> ExtractedToolCalls:
        calls = [ToolCall(id=call_id, function=FunctionCall(name=name, arguments="".join(args)))
                 for call_id, name, args in self._calls]
        return ExtractedToolCalls(tools_called=bool(calls), tool_calls=calls,
                                  content="".join(self._content) or None)

    def _to_delta(self, events: list[Event]) -> Optional[DeltaMessage]:
        msg = DeltaMessage()
        content: list[str] = []
        for kind, chars in events:
            text = "".join(chars)
            if kind == "content":
                content.append(text)
            elif kind == "call":
                self._calls.append((make_tool_call_id(), text, []))
                msg.tool_calls.append(DeltaToolCall(
                    index=len(self._calls) - 1, id=self._calls[-1][0], type="function",
                    function=DeltaFunctionCall(name=text, arguments="")))
            else:
                self._add_arguments(msg, text)
        if content:
            msg.content = "".join(content)
            self._content.append(msg.content)
        return None if msg.is_empty() else msg

    def _add_arguments(self, msg: DeltaMessage, text: str) -> None:
        index = len(self._calls) - 1
        self._calls[index][2].append(text)
        if msg.tool_calls and msg.tool_calls[-1].index == index:
            last = msg.tool_calls[-1].function
            last.arguments = (last.arguments or "") + text
        else:
            msg.tool_calls.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=text)))
