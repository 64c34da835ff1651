"""The character-at-a-time machine every tool-call parser is built on.

A parser is a set of states (methods taking one character). This base class owns what they
share: plain content with marker detection, the raw text of a tool region that might still
turn out not to be a call, and the events the stream turns into OpenAI deltas. Because the
machine decides from the characters alone, never from where chunks happen to be cut, a
streamed output and the same output parsed whole give the same calls and content.

Rules every parser follows:
- Text that could be the start of a marker is held until it is or is not one.
- A tool region that fails before its first call has a name and the start of its arguments
  (no JSON object after the marker, no string name, arguments that are not an object, or the
  output ending there) is given back as content, marker included: nothing of it was streamed.
- Once a call is started (name and arguments begun) it stands: if its arguments break or the
  output ends inside them (max_tokens), the call keeps the arguments as written. A stream
  cannot take back deltas it has sent, and OpenAI's API truncates arguments the same way.
- Whitespace between tool markup and what follows it, or at the end, is dropped; whitespace
  just before a marker is dropped when that marker opens a call.
"""

from __future__ import annotations

from typing import Callable, Optional

from pagellm.entrypoints.openai.tool_parsers.json_scan import CallObjectScanner, Scan

Event = tuple[str, list[str]]  # ("content" | "call" | "args", characters)


class ToolMarkupScanner:
    markers: tuple[str, ...] = ()  # strings that open a tool region anywhere in the content
    start_triggers: str = ""       # characters that open one when they begin the output
    args_keys: tuple[str, ...] = ("arguments",)
    # Text of a region still open when the output ends (cut by max_tokens): content for the auto
    # parsers (the model may not have meant a call); dropped where a grammar forced the markup.
    unfinished_region_is_content = True

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._state: Callable[[str], None] = self._content
        self._held: list[str] = []     # content that may be the start of a marker
        self._ws: list[str] = []       # content whitespace not yet emitted
        self._pending: list[str] = []  # raw text of the tool region since the last commit
        self._fallback = False         # pending goes back to content if the region fails
        self._at_start = True
        self._after_call = False
        self._call_open = False
        self._region_calls = 0
        self._obj: Optional[CallObjectScanner] = None
        self._first_chars = frozenset(m[0] for m in self.markers)

    # -- driving -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        for c in text:
            self._step(c)
        return self._drain()

    def finish(self) -> list[Event]:
        if self._state == self._content:
            held, self._held = self._held, []
            for c in held:
                self._emit_char(c)
        elif self._fallback and self.unfinished_region_is_content:
            self._give_back(self._pending)
        self._pending = []
        self._call_open = False
        if not self._after_call:
            self._emit("content", self._ws)
        self._ws = []
        self._state = self._content
        return self._drain()

    def _step(self, c: str) -> None:
        if self._state != self._content:
            self._pending.append(c)
        self._state(c)

    def _drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit(self, kind: str, chars) -> None:
        if not chars:
            return
        if kind != "call" and self._events and self._events[-1][0] == kind:
            self._events[-1][1].extend(chars)
        else:
            self._events.append((kind, list(chars)))

    # -- content -------------------------------------------------------------------------------
    def _content(self, c: str) -> None:
        if self._at_start:
            if c.isspace():
                self._emit_char(c)
                return
            self._at_start = False
            if c in self.start_triggers:
                self._open_region(c)
                return
        if not self._held and c not in self._first_chars:
            self._emit_char(c)
            return
        self._held.append(c)
        text = "".join(self._held)
        while text:
            if text in self.markers:
                self._held = []
                self._open_region(text)
                return
            if any(m.startswith(text) for m in self.markers):
                break
            self._emit_char(text[0])
            text = text[1:]
        self._held = list(text)

    def _emit_char(self, c: str) -> None:
        if c.isspace():
            self._ws.append(c)
            return
        if not self._after_call:
            self._emit("content", self._ws)
        self._ws = []
        self._after_call = False
        self._emit("content", c)

    def _give_back(self, chars: list[str]) -> None:
        for c in chars:
            self._emit_char(c)

    # -- tool regions --------------------------------------------------------------------------
    def _open_region(self, marker: str) -> None:
        self._pending = self._ws + list(marker)
        self._ws = []
        self._fallback = True
        self._at_start = False
        self._region_calls = 0
        self._enter_region(marker)

    def _enter_region(self, marker: str) -> None:
        """Sets the state that reads what follows `marker` (a start trigger is processed here)."""
        raise NotImplementedError

    def _abandon(self, refeed: bool = True) -> None:
        """The region cannot go on: uncommitted text back to content, the last char re-read."""
        last = self._pending[-1:] if refeed else []
        text = self._pending[:-1] if refeed else self._pending
        if self._fallback:
            self._give_back(text)
        self._pending, self._fallback = [], False
        self._state = self._content
        for c in last:
            self._step(c)

    def _leave(self, refeed: list[str]) -> None:
        """Back to content after markup that was consumed; `refeed` is read again as content."""
        self._pending, self._fallback = [], False
        self._state = self._content
        for c in refeed:
            self._step(c)

    def _start_call(self, name: str) -> None:
        self._emit("call", name)
        self._call_open = True
        self._region_calls += 1
        self._pending, self._fallback = [], False

    def _close_call(self) -> None:
        self._call_open = False
        self._after_call = True
        self._pending = []

    def _begin_item(self) -> None:
        """A later call in a region that already has one: its text alone falls back."""
        if self._region_calls:
            self._pending = self._pending[-1:]
            self._fallback = True

    # -- `{"name": ..., "arguments": {...}}` objects (hermes, llama3, mistral) -------------------
    def _begin_object(self, c: str, after: Callable[[str], None]) -> None:
        self._begin_item()
        self._obj = CallObjectScanner(self.args_keys)
        self._after_object = after
        self._state = self._object
        self._object(c)

    def _object(self, c: str) -> None:
        obj = self._obj
        result = obj.push(c)
        if result is Scan.INVALID:
            if self._call_open:
                self._close_call()
                self._state = self._after_object
                self._step(c)
            else:
                self._abandon()
            return
        if not self._call_open and obj.name is not None and obj.args_started:
            self._start_call(obj.name)
        if self._call_open:
            self._emit("args", obj.take_args())
            self._pending = []
        if result is Scan.DONE:
            if not self._call_open:
                if obj.name is None:
                    self._abandon(refeed=False)
                    return
                self._start_call(obj.name)
                self._emit("args", "{}")
            self._close_call()
            self._state = self._after_object
