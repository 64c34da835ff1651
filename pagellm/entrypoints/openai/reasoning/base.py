"""Reasoning parsers: split `reasoning_content` from `content` for `<think>...</think>` models.

`extract(text)` parses a finished output; `stream()` gives a `ReasoningStream` whose
`feed(delta)` returns a `DeltaMessage` (reasoning and content fragments) or None while a
possible tag is held back, and `finish()` flushes the rest. Both go through one character
machine, so tags split across chunks are found and never leak, and streamed equals whole.
Only the first closing tag ends the reasoning; later tags are content. If the output ends
inside the reasoning (max_tokens), all of it is reasoning and content is None.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

from pagellm.entrypoints.openai.parsed_output import DeltaMessage


class ReasoningParser:
    names: ClassVar[tuple[str, ...]] = ()
    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"
    # True: the output may begin inside the reasoning, the opening tag being in the prompt.
    starts_in_reasoning: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._end_ids: Optional[list[int]] = None
        if tokenizer is not None:
            self._end_ids = list(tokenizer.encode(self.end_tag, add_special_tokens=False))

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self)

    def extract(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """(reasoning_content, content), each None when empty."""
        stream = self.stream()
        parts = [stream.feed(text), stream.finish()]
        reasoning = "".join(p.reasoning_content or "" for p in parts if p)
        content = "".join(p.content or "" for p in parts if p)
        return reasoning or None, content or None

    @property
    def end_ids(self) -> Optional[list[int]]:
        """The closing tag's token ids (None without a tokenizer)."""
        return list(self._end_ids) if self._end_ids is not None else None

    def prompt_closes_reasoning(self, prompt: str) -> bool:
        """Whether the prompt's last reasoning tag is a closing one (Qwen3's enable_thinking=False
        template writes `<think></think>`): the output then starts past the reasoning. A prompt
        whose last tag opens a block (DeepSeek-R1's template), or with no tag, does not. On the
        text: a tag that is not one special token tokenizes differently in context."""
        return prompt.rfind(self.end_tag) > prompt.rfind(self.start_tag)

    def reasoning_ended(self, sequence: Union[str, Sequence[int]]) -> bool:
        """Whether the closing tag occurs in `sequence` (text, or token ids with a tokenizer).

        Pass prompt + output ids: a template that closes the block in the prompt (Qwen3 with
        enable_thinking=False) then counts as ended. For the parser's own view of generated
        text, use `ReasoningStream.reasoning_ended`.
        """
        if isinstance(sequence, str):
            return self.end_tag in sequence
        if self._end_ids is None:
            raise ValueError("reasoning_ended on token ids needs the parser built with a tokenizer")
        ids, end = list(sequence), self._end_ids
        return any(ids[i:i + len(end)] == end for i in range(len(ids) - len(end) + 1))


class ReasoningStream:
    """start -> reasoning -> content, one character at a time; held text may start a tag."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._p = parser
        self._state = "start"
        self._held: list[str] = []

    @property
    def reasoning_ended(self) -> bool:
        """True once the generated text is past the reasoning (or, for a parser that needs the
        opening tag, once it is clear there is none)."""
        return self._state == "content"

    def feed(self, delta: str) -> Optional[DeltaMessage]:
        reasoning: list[str] = []
        content: list[str] = []
        for c in delta:
            self._step(c, reasoning, content)
        return _message(reasoning, content)

    def finish(self) -> Optional[DeltaMessage]:
        held, self._held = "".join(self._held), []
        if self._state == "start":
            self._state = "reasoning" if self._p.starts_in_reasoning else "content"
        out = ([held], []) if self._state == "reasoning" else ([], [held])
        return _message(*out)

    def _step(self, c: str, reasoning: list[str], content: list[str]) -> None:
        if self._state == "content":
            content.append(c)
            return
        self._held.append(c)
        text = "".join(self._held)
        if self._state == "start":
            self._at_start(text, reasoning, content)
            return
        tag = self._p.end_tag
        if text == tag:
            self._held, self._state = [], "content"
        elif not tag.startswith(text):
            cut = _longest_tag_prefix_suffix(text, tag)
            reasoning.append(text[:len(text) - cut])
            self._held = list(text[len(text) - cut:])

    def _at_start(self, text: str, reasoning: list[str], content: list[str]) -> None:
        tag = self._p.start_tag
        stripped = text.lstrip()
        if stripped == tag:
            self._held, self._state = [], "reasoning"
        elif not tag.startswith(stripped):
            self._held = []
            if self._p.starts_in_reasoning:
                self._state = "reasoning"
                for c in text:
                    self._step(c, reasoning, content)
            else:
                self._state = "content"
                content.append(text)


def _longest_tag_prefix_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could still grow into `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _message(reasoning: list[str], content: list[str]) -> Optional[DeltaMessage]:
    msg = DeltaMessage(reasoning_content="".join(reasoning) or None, content="".join(content) or None)
    return None if msg.is_empty() else msg

