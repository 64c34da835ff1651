"""Incremental JSON scanning for tool-call parsers: where a value ends, one character at a time.

The parsers stream a call's arguments as the model writes them, so they must know, character
by character, whether the text is still inside the arguments object. These scanners track
strings, escapes and bracket nesting, and reject characters that JSON cannot have outside a
string (a stray `<` of closing markup, say). They do not check every rule of the grammar
(a missing comma passes); the finished arguments reach the client as the model wrote them.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Optional


class Scan(enum.Enum):
    CONTINUE = 0     # the character belongs to the value, which goes on
    DONE = 1         # the character closed the value
    DONE_BEFORE = 2  # the value ended just before this character (numbers, literals)
    INVALID = 3      # the character cannot continue a JSON value here


_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
_STRUCTURAL = frozenset("{}[]\",: \t\r\n") | _NUMBER_CHARS | frozenset("trufalsn")
_CLOSER = {"}": "{", "]": "["}


class JsonSpan:
    """Follows one JSON value (object, array, string, number or literal) to its end."""

    def __init__(self) -> None:
        self._kind: Optional[str] = None
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self._scalar: list[str] = []

    def push(self, c: str) -> Scan:
        if self._kind is None:
            return self._start(c)
        if self._in_string:
            return self._string_char(c)
        if self._kind in ("number", "literal"):
            return self._scalar_char(c)
        return self._container_char(c)

    def _start(self, c: str) -> Scan:
        if c in "{[":
            self._kind = "container"
            self._stack.append(c)
        elif c == '"':
            self._kind = "string"
            self._in_string = True
        elif c == "-" or c.isdigit():
            self._kind = "number"
            self._scalar.append(c)
        elif c in "tfn":
            self._kind = "literal"
            self._scalar.append(c)
        else:
            return Scan.INVALID
        return Scan.CONTINUE

    def _string_char(self, c: str) -> Scan:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            self._in_string = False
            if self._kind == "string":
                return Scan.DONE
        return Scan.CONTINUE

    def _scalar_char(self, c: str) -> Scan:
        text = "".join(self._scalar)
        if c in _NUMBER_CHARS or c.isalpha():
            text += c
            if self._kind == "literal" and not any(lit.startswith(text) for lit in _LITERALS):
                return Scan.INVALID
            self._scalar.append(c)
            return Scan.CONTINUE
        if self._kind == "literal":
            return Scan.DONE_BEFORE if text in _LITERALS else Scan.INVALID
        return Scan.DONE_BEFORE if _NUMBER.fullmatch(text) else Scan.INVALID

    def _container_char(self, c: str) -> Scan:
        if c == '"':
            self._in_string = True
        elif c in "{[":
            self._stack.append(c)
        elif c in "}]":
            if self._stack[-1] != _CLOSER[c]:
                return Scan.INVALID
            self._stack.pop()
            if not self._stack:
                return Scan.DONE
        elif c not in _STRUCTURAL:
            return Scan.INVALID
        return Scan.CONTINUE


class CallObjectScanner:
    """Reads one `{"name": "...", "<args key>": {...}}` object, one character at a time.

    `name` is set once its string is complete; `args_started` once the arguments object has
    begun; the arguments' raw characters collect in `new_args` for the caller to take. Keys in
    other orders work (arguments before the name are held until the name is known); other keys
    are skipped; a repeated name or arguments key is skipped too. The arguments must be an object.
    """

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self._args_keys = args_keys
        self._state = "open"
        self._raw: list[str] = []
        self._key_text = ""
        self._role = "skip"
        self._span: Optional[JsonSpan] = None
        self.name: Optional[str] = None
        self.args_started = False
        self.new_args: list[str] = []

    def push(self, c: str) -> Scan:
        return getattr(self, "_" + self._state)(c)

    def _open(self, c: str) -> Scan:
        if c.isspace():
            return Scan.CONTINUE
        if c != "{":
            return Scan.INVALID
        self._state = "key_or_close"
        return Scan.CONTINUE

    def _key_or_close(self, c: str) -> Scan:
        if c == "}":
            return Scan.DONE
        return self._key_start(c)

    def _key_start(self, c: str) -> Scan:
        if c.isspace():
            return Scan.CONTINUE
        if c != '"':
            return Scan.INVALID
        self._span, self._raw = JsonSpan(), [c]
        self._span.push(c)
        self._state = "key"
        return Scan.CONTINUE

    def _key(self, c: str) -> Scan:
        self._raw.append(c)
        if self._span.push(c) is not Scan.DONE:
            return Scan.CONTINUE
        try:
            self._key_text = json.loads("".join(self._raw))
        except ValueError:
            return Scan.INVALID
        self._state = "colon"
        return Scan.CONTINUE

    def _colon(self, c: str) -> Scan:
        if c.isspace():
            return Scan.CONTINUE
        if c != ":":
            return Scan.INVALID
        self._state = "value_start"
        return Scan.CONTINUE

    def _value_start(self, c: str) -> Scan:
        if c.isspace():
            return Scan.CONTINUE
        if self._key_text == "name" and self.name is None:
            self._role = "name"
        elif self._key_text in self._args_keys and not self.args_started:
            self._role = "args"
        else:
            self._role = "skip"
        if (self._role == "name" and c != '"') or (self._role == "args" and c != "{"):
            return Scan.INVALID
        self._span, self._raw = JsonSpan(), []
        self._state = "value_char"
        self.args_started = self.args_started or self._role == "args"
        return self._value_char(c)

    def _value_char(self, c: str) -> Scan:
        result = self._span.push(c)
        if result is Scan.INVALID:
            return result
        if result is not Scan.DONE_BEFORE:
            if self._role == "args":
                self.new_args.append(c)
            elif self._role == "name":
                self._raw.append(c)
        if result is Scan.CONTINUE:
            return result
        if self._role == "name" and not self._set_name():
            return Scan.INVALID
        self._state = "comma_or_close"
        return self._comma_or_close(c) if result is Scan.DONE_BEFORE else Scan.CONTINUE

    def _set_name(self) -> bool:
        try:
            name = json.loads("".join(self._raw))
        except ValueError:
            return False
        self.name = name or None
        return bool(name)

    def _comma_or_close(self, c: str) -> Scan:
        if c.isspace():
            return Scan.CONTINUE
        if c == ",":
            self._state = "key_start"
            return Scan.CONTINUE
        return Scan.DONE if c == "}" else Scan.INVALID

    def take_args(self) -> str:
        text = "".join(self.new_args)
        self.new_args.clear()
        return text
