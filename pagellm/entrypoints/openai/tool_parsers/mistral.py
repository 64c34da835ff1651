"""Mistral calls, both forms the tokenizers have used:

- `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers): a JSON array of calls;
- `[TOOL_CALLS]name[ARGS]{...}` (v11+), repeated per call; an optional `[CALL_ID]id` before
  `[ARGS]` is read and dropped (ids are made here, like every other parser's).

`[TOOL_CALLS]` is a control token: requests need skip_special_tokens=False.
"""

from __future__ import annotations

from pagellm.entrypoints.openai.tool_parsers.base import ToolParser
from pagellm.entrypoints.openai.tool_parsers.json_scan import JsonSpan, Scan
from pagellm.entrypoints.openai.tool_parsers.scanner import ToolMarkupScanner

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"


def _name_char(c: str) -> bool:
    return c.isalnum() or c in "_-."


class MistralScanner(ToolMarkupScanner):
    markers = (TOOL_CALLS,)

    def _enter_region(self, marker: str) -> None:
        self._name: list[str] = []
        self._id_seen = False
        self._state = self._after_marker

    def _after_marker(self, c: str) -> None:
        if c.isspace():
            return
        if c == "[":
            self._state = self._array_item
        elif _name_char(c):
            self._name = [c]
            self._state = self._call_name
        else:
            self._abandon()

    # -- [TOOL_CALLS][{...}, {...}] -------------------------------------------------------------
    def _array_item(self, c: str) -> None:
        if c.isspace():
            return
        if c == "{":
            self._begin_object(c, after=self._array_separator)
        elif c == "]" and self._region_calls:
            self._leave([])
        else:
            self._abandon()

    def _array_separator(self, c: str) -> None:
        if c.isspace():
            return
        if c == ",":
            self._state = self._array_item
        elif c == "]":
            self._leave([])
        else:
            self._leave(self._pending[-1:])

    # -- [TOOL_CALLS]name[ARGS]{...} ------------------------------------------------------------
    def _call_name(self, c: str) -> None:
        if _name_char(c):
            self._name.append(c)
        elif c == "[":
            self._tag = [c]
            self._state = self._name_tag
        else:
            self._abandon()

    def _name_tag(self, c: str) -> None:
        self._tag.append(c)
        tag = "".join(self._tag)
        if tag == ARGS:
            self._state = self._args_start
        elif tag == CALL_ID and not self._id_seen:
            self._id_seen = True
            self._state = self._call_id
        elif not (ARGS.startswith(tag) or CALL_ID.startswith(tag)):
            self._abandon()

    def _call_id(self, c: str) -> None:
        if c == "[":
            self._tag = [c]
            self._state = self._name_tag
        elif not c.isalnum():
            self._abandon()

    def _args_start(self, c: str) -> None:
        if c.isspace():
            return
        if c != "{":
            self._abandon()
            return
        self._span = JsonSpan()
        self._start_call("".join(self._name))
        self._state = self._args
        self._args(c)

    def _args(self, c: str) -> None:
        result = self._span.push(c)
        self._pending = []
        if result is Scan.INVALID:
            self._close_call()
            self._leave([c])
            return
        self._emit("args", c)
        if result is Scan.DONE:
            self._close_call()
            self._leave([])


class MistralToolParser(ToolParser):
    names = ("mistral",)
    needs_special_tokens = True

    def new_scanner(self) -> ToolMarkupScanner:
        return MistralScanner()
