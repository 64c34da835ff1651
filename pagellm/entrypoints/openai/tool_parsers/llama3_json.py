"""Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`.

A call is recognised when the output begins with `{` (after whitespace) or at a
`<|python_tag|>`; several calls are separated by `;`. `arguments` is accepted for
`parameters`. An opening object without a string name (a plain JSON answer) stays content.
"""

from __future__ import annotations

from pagellm.entrypoints.openai.tool_parsers.base import ToolParser
from pagellm.entrypoints.openai.tool_parsers.scanner import ToolMarkupScanner

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonScanner(ToolMarkupScanner):
    markers = (PYTHON_TAG,)
    start_triggers = "{"
    args_keys = ("parameters", "arguments")

    def _enter_region(self, marker: str) -> None:
        if marker == "{":
            self._begin_object(marker, after=self._separator)
        else:
            self._state = self._before_object

    def _before_object(self, c: str) -> None:
        if c.isspace():
            return
        if c != "{":
            self._abandon()
            return
        self._begin_object(c, after=self._separator)

    def _separator(self, c: str) -> None:
        if c.isspace():
            return
        if c == ";":
            self._state = self._before_object
        else:
            self._leave(self._pending[-1:])


class Llama3JsonToolParser(ToolParser):
    names = ("llama3_json", "llama4_json")
    needs_special_tokens = True

    def new_scanner(self) -> ToolMarkupScanner:
        return Llama3JsonScanner()
