"""Pythonic calls (Llama 3.2/4, ToolACE style): `[get_weather(city="Paris"), f(x=1)]`.

The output must begin with `[` (after whitespace) for a list of calls to be recognised. Each
call is read up to its closing parenthesis, then parsed with `ast` and its keyword values read
with `ast.literal_eval` (literals only; nothing is evaluated), and sent as one delta with its
arguments as JSON. A call that is not a name with literal keyword arguments (positional
arguments, `**kw`, expressions, values JSON cannot hold) is not a call: if no call came before
it, the whole list is content; otherwise its text onwards is content.
"""

from __future__ import annotations

import ast
import json
from typing import Optional

from pagellm.entrypoints.openai.tool_parsers.base import ToolParser
from pagellm.entrypoints.openai.tool_parsers.scanner import ToolMarkupScanner


class _PythonCallEnd:
    """Follows Python source to the parenthesis closing a call (strings, triple quotes, nesting)."""

    def __init__(self) -> None:
        self.depth = 1
        self._quote: Optional[str] = None  # the open string's quote char
        self._triple = False
        self._opening = ""  # a quote char just seen outside a string, and how many in a row:
        self._run = 0       # two are an empty string, three open a triple-quoted one
        self._closing = 0   # quote chars in a row inside a triple-quoted string
        self._escape = False

    def push(self, c: str) -> bool:
        """True when `c` closes the call."""
        if self._quote is not None:
            self._string_char(c)
            return False
        if self._run:
            if c == self._opening and self._run < 3:
                self._run += 1
                if self._run == 3:
                    self._open_string(triple=True)
                return False
            run, self._run = self._run, 0
            if run == 1:
                self._open_string(triple=False)
                self._string_char(c)
                return False
        if c in "'\"":
            self._opening, self._run = c, 1
            return False
        if c in "([{":
            self.depth += 1
        elif c in ")]}":
            self.depth -= 1
        return self.depth == 0

    def _open_string(self, triple: bool) -> None:
        self._quote, self._triple, self._run, self._closing = self._opening, triple, 0, 0

    def _string_char(self, c: str) -> None:
        if self._escape or c == "\\" or c != self._quote:
            self._escape = not self._escape and c == "\\"
            self._closing = 0
        elif not self._triple:
            self._quote = None
        else:
            self._closing += 1
            if self._closing == 3:
                self._quote = None


def parse_call(source: str) -> Optional[tuple[str, str]]:
    """(name, JSON arguments) of `name(k=literal, ...)`, or None if it is not such a call."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or node.args:
        return None
    name = _dotted_name(node.func)
    if name is None or any(kw.arg is None for kw in node.keywords):
        return None
    try:
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        return name, json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _dotted_name(func: ast.expr) -> Optional[str]:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        head = _dotted_name(func.value)
        return None if head is None else f"{head}.{func.attr}"
    return None


class PythonicScanner(ToolMarkupScanner):
    start_triggers = "["

    def _enter_region(self, marker: str) -> None:
        self._state = self._item_start

    def _item_start(self, c: str) -> None:
        if c.isspace():
            return
        if c.isalpha() or c == "_":
            self._begin_item()
            self._call = [c]
            self._state = self._call_name
        elif c == "]" and self._region_calls:
            self._leave([])
        else:
            self._abandon()

    def _call_name(self, c: str) -> None:
        self._call.append(c)
        if c == "(":
            self._end = _PythonCallEnd()
            self._state = self._call_args
        elif not (c.isalnum() or c in "_."):
            self._abandon()

    def _call_args(self, c: str) -> None:
        self._call.append(c)
        if not self._end.push(c):
            return
        parsed = parse_call("".join(self._call))
        if parsed is None:
            self._abandon(refeed=False)
            return
        self._start_call(parsed[0])
        self._emit("args", parsed[1])
        self._close_call()
        self._state = self._separator

    def _separator(self, c: str) -> None:
        if c.isspace():
            return
        if c == ",":
            self._state = self._item_start
        elif c == "]":
            self._leave([])
        else:
            self._leave(self._pending[-1:])


class PythonicToolParser(ToolParser):
    names = ("pythonic",)

    def new_scanner(self) -> ToolMarkupScanner:
        return PythonicScanner()
