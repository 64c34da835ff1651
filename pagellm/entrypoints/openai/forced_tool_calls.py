"""tool_choice "required" and named functions: the JSON schema that forces the call, and the
parser that turns what the model then writes into OpenAI tool calls.

    required  [{"name": "<a listed function>", "parameters": {...that function's arguments...}}, ...]
              one or more calls (exactly one with parallel_tool_calls=false)
    named f   {...f's arguments...}: the arguments object alone, the name being known

Both are plain JSON schemas, so both grammar backends enforce them and the arguments always
validate against the function's `parameters` (a structural tag would let the model write its
own markup, but xgrammar alone compiles those). The output is compact JSON (", " and ": "
separators, no free whitespace), which spares tokens and the whitespace runs small models
fall into. The parsers run on the same character machine as the `auto` parsers, so a streamed
response and a whole one give the same calls.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.tool_parsers.base import ToolParser
from pagellm.entrypoints.openai.tool_parsers.json_scan import JsonSpan, Scan
from pagellm.entrypoints.openai.tool_parsers.scanner import ToolMarkupScanner

REQUIRED_ARGS_KEY = "parameters"


def function_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A function's arguments schema; a function without `parameters` takes none (OpenAI)."""
    params = tool["function"].get("parameters")
    return copy.deepcopy(params) if params else {"type": "object", "properties": {}, "additionalProperties": False}


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return function_parameters(next(t for t in tools if t["function"]["name"] == name))


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """An array of calls, each one of the listed functions with its arguments. Each function's
    `$defs` move to the root, where its `#/$defs/...` references point once it is nested."""
    defs: dict[str, Any] = {}
    alternatives = []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        params = function_parameters(tool)
        for key, value in (params.pop("$defs", None) or {}).items():
            if key in defs and defs[key] != value:
                raise OpenAIError(f"tools define $defs/{key} differently (function {name!r} and an earlier one); "
                                  "tool_choice \"required\" needs one meaning per definition name", 400,
                                  param=f"tools.{i}.function.parameters", code="invalid_value")
            defs[key] = value
        alternatives.append({"type": "object",
                             "properties": {"name": {"enum": [name]}, REQUIRED_ARGS_KEY: params},
                             "required": ["name", REQUIRED_ARGS_KEY], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def forced_constraint(tools: list[dict[str, Any]], named: Optional[str], parallel: bool) -> dict[str, Any]:
    """The structured-outputs fields of a forced tool choice."""
    schema = named_schema(tools, named) if named is not None else required_schema(tools, parallel)
    return {"json": schema, "disable_any_whitespace": True}


class NamedCallScanner(ToolMarkupScanner):
    """The output is the arguments object of one known function."""
    start_triggers = "{"
    unfinished_region_is_content = False  # the grammar wrote it: markup even when cut short

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name
        self._span: Optional[JsonSpan] = None

    def _enter_region(self, marker: str) -> None:
        self._start_call(self._name)
        self._span = JsonSpan()
        self._state = self._arguments
        self._arguments(marker)

    def _arguments(self, c: str) -> None:
        result = self._span.push(c)
        if result is Scan.INVALID:  # not under the grammar; the call keeps what it has
            self._close_call()
            self._leave([c])
            return
        self._emit("args", c)
        self._pending = []
        if result is Scan.DONE:
            self._close_call()
            self._leave([])


class RequiredCallsScanner(ToolMarkupScanner):
    """The output is a JSON array of {"name": ..., "parameters": {...}} calls."""
    start_triggers = "["
    args_keys = (REQUIRED_ARGS_KEY,)
    unfinished_region_is_content = False  # a call cut by max_tokens is dropped, not shown as content

    def _enter_region(self, marker: str) -> None:
        self._state = self._before_call

    def _before_call(self, c: str) -> None:
        if c.isspace():
            return
        if c == "{":
            self._begin_object(c, after=self._separator)
        else:
            self._abandon()

    def _separator(self, c: str) -> None:
        if c.isspace():
            return
        if c == ",":
            self._state = self._before_call
        elif c == "]":
            self._leave([])
        else:
            self._leave(self._pending[-1:])


class ForcedToolParser(ToolParser):
    """Parses the output of a forced choice (`named` set: that function; None: "required")."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]], named: Optional[str]) -> None:
        super().__init__(tokenizer, tools)
        self.named = named

    def new_scanner(self) -> ToolMarkupScanner:
        return NamedCallScanner(self.named) if self.named is not None else RequiredCallsScanner()
