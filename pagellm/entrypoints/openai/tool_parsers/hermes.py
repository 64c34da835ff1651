"""Hermes-style calls (Hermes 2 Pro/3, Qwen2.5/Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Several calls per message, each in its own tags, with text allowed before, between and after.
A missing closing tag ends the call at the end of its object.
"""

from __future__ import annotations

from pagellm.entrypoints.openai.tool_parsers.base import ToolParser
from pagellm.entrypoints.openai.tool_parsers.scanner import ToolMarkupScanner

START, END = "<tool_call>", "</tool_call>"


class HermesScanner(ToolMarkupScanner):
    markers = (START,)

    def _enter_region(self, marker: str) -> None:
        self._state = self._before_object

    def _before_object(self, c: str) -> None:
        if c.isspace():
            return
        if c != "{":
            self._abandon()
            return
        self._begin_object(c, after=self._end_tag)

    def _end_tag(self, c: str) -> None:
        seen = "".join(self._pending).lstrip()
        if seen == END:
            self._leave([])
        elif not END.startswith(seen):
            self._leave(self._pending)


class HermesToolParser(ToolParser):
    names = ("hermes",)

    def new_scanner(self) -> ToolMarkupScanner:
        return HermesScanner()
