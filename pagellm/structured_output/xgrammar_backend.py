"""xgrammar (the default backend): JSON schema, any JSON, regex, choice, GBNF grammars, structural tags."""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar as xgr

from pagellm.structured_output import structural_tag
from pagellm.structured_output.auto_backend import unenforced_by_xgrammar
from pagellm.structured_output.params import StructuredOutputsParams


# xgrammar's messages start "[16:00:45] /project/cpp/regex_converter.cc:94: ": where, not what.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


# Longest run of whitespace JSON may have between tokens: enough for pretty-printed nesting.
MAX_WHITESPACE_RUN = 16


class XGrammarMatcher:
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._m = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def reset(self) -> None:
        self._m.reset()


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 refuse_unenforced: bool = True) -> None:
        """refuse_unenforced: a JSON schema with keywords xgrammar would drop is a ValueError (the
        "auto" backend checks first and sends those schemas to llguidance)."""
        self._refuse_unenforced = refuse_unenforced
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # Its own cache is by constraint text too; the manager's cache spares the lookup and the lock.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind, spec = params.kind, params.spec
        any_ws = not params.disable_any_whitespace
        try:
            if kind in ("json", "json_object"):
                dropped = unenforced_by_xgrammar(json.loads(spec)) if self._refuse_unenforced else []
                if dropped:
                    raise ValueError(f"the json constraint does not compile: xgrammar does not enforce "
                                     f"{'; '.join(dropped)}; use --structured-outputs-backend auto or guidance")
                # json_object's spec is {"type": "object"}: the builtin JSON grammar would allow any value.
                # Free whitespace, but not unbounded: small models otherwise fall into "\n\n\n..." between tokens.
                grammar = xgr.Grammar.from_json_schema(spec, any_whitespace=any_ws,
                                                       max_whitespace_cnt=MAX_WHITESPACE_RUN if any_ws else None)
                return self._compiler.compile_grammar(_strict_bounded_strings(grammar))
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in params.choice or [])
                return self._compiler.compile_grammar(f"root ::= {alternatives}")
            if kind == "grammar":
                return self._compiler.compile_grammar(spec)
            return self._compiler.compile_structural_tag(json.dumps(structural_tag.xgrammar_format(
                structural_tag.parse(spec))))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the {kind} constraint does not compile: {_LOG_PREFIX.sub('', str(exc)).strip()}") from None

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)


# xgrammar (0.2.x, its issue #800) writes a string with minLength/maxLength as a bounded repeat of
# this class, which lets raw control characters through (invalid JSON; strict parsers refuse it).
# The repeat keeps one character class, without them. A rule per character that also allowed
# escapes made the token-mask fill ~400x slower (1.69 vs 0.004 ms a token on a 30-field schema):
# xgrammar's mask cache only covers a repeated class. So no escape inside a length-bounded string
# on this backend; llguidance (`--structured-outputs-backend guidance`) writes them.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_STRICT_JSON_CHAR = r'[^\0-\x1f\"\\]'


def _strict_bounded_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _STRICT_JSON_CHAR))
