"""User-facing sampling parameters, with vLLM's names and meanings.

Every field is validated once, at construction, so a bad value fails with a
`ValueError` naming the field before the request ever reaches the engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

# Below this temperature we treat sampling as greedy (avoids dividing logits by ~0).
_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    # Filled by the engine: token-id sequences for `bad_words` (tokenizer needed).
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.seed is not None:
            self.seed = int(self.seed)
        self._validate()

    # -- validation ---------------------------------------------------------------
    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if not self.temperature >= 0.0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be -1 or 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                bad(name, "must be a non-negative integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                bad("allowed_token_ids", "must not be empty")
            if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "must be non-negative integers")
        if self.logit_bias is not None:
            if any(k < 0 for k in self.logit_bias):
                bad("logit_bias", "keys must be non-negative token ids")
            if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
                bad("logit_bias", "values must be in [-100, 100]")
        if not self.detokenize and (self.stop or self.bad_words):
            bad("detokenize", "stop strings and bad_words need detokenize=True")

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks token ids against the model's vocabulary (needs the model, so not in __post_init__)."""
        for name, ids in (
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("logit_bias", list((self.logit_bias or {}).keys())),
        ):
            out = [t for t in ids if t >= vocab_size]
            if out:
                raise ValueError(f"SamplingParams.{name}: token ids {out[:5]} are outside the vocabulary (size {vocab_size})")

    # -- derived ------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
