"""llguidance: JSON schema, regex, choice, Lark / GBNF grammars and structural tags of JSON-schema
tags, with an Earley parser (no up-front compile of the whole grammar, so large schemas start fast)."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from pagellm.structured_output import structural_tag
from pagellm.structured_output.params import StructuredOutputsParams

MAX_WHITESPACE_RUN = 16  # as the xgrammar backend's

_FORMATS = {"json": "json_schema", "json_object": "json_schema", "regex": "regex", "choice": "choice",
            "grammar": "grammar", "structural_tag": None}


class GuidanceMatcher:
    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._m = llguidance.LLMatcher(tokenizer, grammar)

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.consume_token(token_id)) and not self._m.is_error()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_stopped())

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def reset(self) -> None:
        self._m.reset()


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=stop_token_ids or None)

    def compile(self, params: StructuredOutputsParams) -> str:
        kind = params.kind
        if kind not in _FORMATS:
            raise ValueError(f"the guidance backend has no {kind} constraints; use the xgrammar backend")
        spec = params.spec
        if kind in ("json", "json_object"):
            schema = json.loads(spec)
            if isinstance(schema, dict):
                # llguidance's own options: no whitespace between JSON tokens, or runs of at most
                # MAX_WHITESPACE_RUN (unbounded, a small model falls into endless whitespace).
                options = {"whitespace_flexible": False} if params.disable_any_whitespace else \
                    {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE_RUN}}}"}
                spec = json.dumps({**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}})
        try:
            if kind == "structural_tag":
                grammar = llguidance.StructTag.to_grammar([
                    llguidance.StructTag(trigger=t.trigger, begin=t.begin, grammar=t.schema, end=t.end)
                    for t in structural_tag.tags_of(structural_tag.parse(spec))])
            else:
                grammar = llguidance.grammar_from(_FORMATS[kind], spec)
        except ValueError as exc:
            raise ValueError(f"the {kind} constraint does not compile: {exc}") from None
        ok, error = _validate(grammar, self._tokenizer)
        if not ok:
            raise ValueError(f"the {kind} constraint does not compile: {error}")
        return grammar

    def matcher(self, compiled: str) -> GuidanceMatcher:
        return GuidanceMatcher(self._tokenizer, compiled)


def _validate(grammar: str, tokenizer: llguidance.LLTokenizer) -> tuple[bool, str]:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    return (not is_error), "; ".join(messages)
