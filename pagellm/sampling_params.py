"""User-facing sampling parameters, with vLLM's names and meanings.

Every field is validated once, at construction, so a bad value fails with a
`ValueError` naming the field before the request ever reaches the engine.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from pagellm.structured_output.params import StructuredOutputsParams

# Below this temperature we treat sampling as greedy (avoids dividing logits by ~0).
_GREEDY_EPS = 1e-5

# Seeds are unsigned 64-bit, as OpenAI and torch.Generator take them. A request's n samples use
# seed + i, reduced modulo 2**64 (see `sample_seed`), so every derived seed stays in range too.
SEED_MODULUS = 1 << 64

# Bounds on the counts a request may ask for: each one sizes memory or work per request.
MAX_N = 128  # OpenAI's limit for n
MAX_STOP_STRINGS = 64
MAX_TOKEN_ID_LIST = 4096  # stop_token_ids, allowed_token_ids, logit_bias entries, bad_words
MAX_MAX_TOKENS = 1 << 20  # beyond any context; a sanity bound for offline callers

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    """True when `text` holds a UTF-16 surrogate code point, which no tokenizer (or UTF-8) can encode."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _is_int(value) -> bool:
    """An int that is not a bool (True is not a token id or a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    # Grammar-constrained decoding (JSON schema, regex, choice, grammar); a dict is converted.
    structured_outputs: Optional[StructuredOutputsParams] = None
    # Filled by the engine's input processor from `bad_words` (it needs the tokenizer): each bad word
    # as token ids, as written and with a leading space. Read by the sampler; not validated here,
    # since the processor derives it from the already validated `bad_words`.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

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
        self._validate()
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    def sample_seed(self, index: int) -> Optional[int]:
        """The seed of sample `index` of this request: seed + index, wrapped into [0, 2**64)."""
        return None if self.seed is None else (self.seed + index) % SEED_MODULUS

    # -- validation ---------------------------------------------------------------
    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}: {why}, got {_shorten(getattr(self, name))}")

        self._validate_numbers(bad)
        self._validate_counts(bad)
        self._validate_lists(bad)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")
        if not self.detokenize and (self.stop or self.bad_words):
            bad("detokenize", "stop strings and bad_words need detokenize=True")

    def _validate_numbers(self, bad) -> None:
        """Real-valued fields: numbers (not bools), finite, in range. NaN fails every comparison."""
        ranges = {
            "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0), "min_p": (0.0, 1.0),
        }
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                bad(name, "must be a finite number")
            low, high = ranges.get(name, (-math.inf, math.inf))
            if not low <= value <= high:
                bad(name, f"must be in [{low:g}, {high:g}]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if not self.temperature >= 0.0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_MODULUS):
            bad("seed", "must be an integer in [0, 2**64 - 1]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a mapping of token id to bias")
            if any(not _is_int(k) and not (isinstance(k, str) and k.isdigit()) for k in self.logit_bias):
                bad("logit_bias", "keys must be non-negative token ids")
            if any(int(k) < 0 for k in self.logit_bias):
                bad("logit_bias", "keys must be non-negative token ids")
            if any(not _is_real(v) or not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
                bad("logit_bias", "values must be finite numbers in [-100, 100]")
            if len(self.logit_bias) > MAX_TOKEN_ID_LIST:
                bad("logit_bias", f"may have at most {MAX_TOKEN_ID_LIST} entries")

    def _validate_counts(self, bad) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be -1 or 0 (off) or a positive integer")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_MAX_TOKENS):
            bad("max_tokens", f"must be an integer in [1, {MAX_MAX_TOKENS}]")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                bad(name, "must be a non-negative integer")

    def _validate_lists(self, bad) -> None:
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop", "must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"may have at most {MAX_STOP_STRINGS} strings")
        if any(not isinstance(w, str) for w in self.bad_words):
            bad("bad_words", "must be strings")
        for name in ("stop", "bad_words"):
            if any(has_lone_surrogate(s) for s in getattr(self, name)):
                bad(name, "must be valid Unicode (a lone UTF-16 surrogate is not)")
        lists = [("stop_token_ids", self.stop_token_ids), ("bad_words", self.bad_words)]
        if self.allowed_token_ids is not None:
            lists.append(("allowed_token_ids", self.allowed_token_ids))
            if len(self.allowed_token_ids) == 0:
                bad("allowed_token_ids", "must not be empty")
        for name, values in lists:
            if len(values) > MAX_TOKEN_ID_LIST:
                bad(name, f"may have at most {MAX_TOKEN_ID_LIST} entries")
            if name != "bad_words" and any(not _is_int(t) or t < 0 for t in values):
                bad(name, "must be non-negative integers")

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks token ids against the model's vocabulary (needs the model, so not in __post_init__)."""
        for name, ids in (
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("logit_bias", list((self.logit_bias or {}).keys())),
            ("stop_token_ids", self.stop_token_ids),
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


def _shorten(value, limit: int = 200) -> str:
    """repr for error messages, cut short: a bad 4096-entry list should not fill the response."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
