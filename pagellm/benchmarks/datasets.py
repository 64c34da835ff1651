"""Synthetic, offline benchmark datasets: lists of (prompt token ids, output length), seeded.

- `random`: every prompt has exactly `input_len` random ordinary token ids and asks for exactly
  `output_len` tokens (the benchmark sets `ignore_eos`).
- `sharegpt-like`: input and output lengths drawn from log-normals whose means match ShareGPT's
  published ones (about 200 prompt and 180 output tokens per conversation turn), with ShareGPT's
  usual filters (at least 4 tokens each, prompt <= 1024, prompt + output <= 2048); ids are random.
- `prefix-shared`: `num_prefixes` shared "system prompts" of `prefix_len` tokens; request i uses
  prefix i mod K followed by its own `suffix_len` unique tokens (the prefix-caching workload).
- `edit-like`: text prompts asking to rewrite a generated block of about `input_len` tokens (code
  with a variable to rename, a paragraph with typos, a JSON document with a value to change) and
  output it whole, at most `output_len` tokens (`edit_like.py`). Real text, so it needs the
  model's tokenizer; the answer repeats the prompt, which is what speculative decoding exploits.

The others' ids are drawn from a caller-given pool of ordinary (non-special) token ids, so no prompt holds
an EOS or a chat-template marker. Everything is reproducible from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

DATASETS = ("random", "sharegpt-like", "prefix-shared", "edit-like")

# ShareGPT's mean lengths per turn, as usually quoted for Llama-family tokenizers.
SHAREGPT_MEAN_INPUT = 200.0
SHAREGPT_MEAN_OUTPUT = 180.0
# Spread of the log-normals; ShareGPT's lengths span more than an order of magnitude.
SHAREGPT_SIGMA_INPUT = 0.9
SHAREGPT_SIGMA_OUTPUT = 0.8
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_INPUT = 1024
SHAREGPT_MAX_TOTAL = 2048


@dataclass(frozen=True)
class SampleRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def ordinary_token_ids(tokenizer=None, vocab_size: Optional[int] = None) -> list[int]:
    """Ids a prompt may hold: the tokenizer's vocabulary minus its special tokens.

    Without a tokenizer, ids [min(256, vocab/2), vocab_size) (low ids hold the special tokens
    of byte-level BPE vocabularies such as SmolLM2's)."""
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
        return [i for i in range(len(tokenizer)) if i not in special]
    if vocab_size is None or vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 when no tokenizer is given, got {vocab_size!r}")
    return list(range(min(256, vocab_size // 2), vocab_size))


def _ids(rng: random.Random, pool: Sequence[int], n: int) -> list[int]:
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def random_dataset(pool: Sequence[int], num_prompts: int, input_len: int, output_len: int,
                   seed: int = 0) -> list[SampleRequest]:
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        _positive(name, value)
    rng = random.Random(seed)
    return [SampleRequest(_ids(rng, pool, input_len), output_len) for _ in range(num_prompts)]


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def truncated_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[X | lo <= X <= hi] for X ~ LogNormal(mu, sigma)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    mass = _phi(b) - _phi(a)
    return math.exp(mu + sigma * sigma / 2) * (_phi(b - sigma) - _phi(a - sigma)) / mass


def fit_lognormal_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    """mu such that the log-normal, kept to [lo, hi] (the filters), has the given mean (bisection)."""
    if not lo < mean < hi:
        raise ValueError(f"mean {mean} must lie strictly between {lo} and {hi}")
    left, right = math.log(lo) - 5 * sigma, math.log(hi) + 5 * sigma
    for _ in range(100):
        mid = (left + right) / 2
        if truncated_lognormal_mean(mid, sigma, lo, hi) < mean:
            left = mid
        else:
            right = mid
    return (left + right) / 2


def sharegpt_like_lengths(num_prompts: int, seed: int = 0, mean_input: float = SHAREGPT_MEAN_INPUT,
                          mean_output: float = SHAREGPT_MEAN_OUTPUT,
                          max_total: int = SHAREGPT_MAX_TOTAL) -> list[tuple[int, int]]:
    """(input_len, output_len) pairs; draws outside ShareGPT's filters are redrawn."""
    _positive("num_prompts", num_prompts)
    if max_total < 2 * SHAREGPT_MIN_LEN:
        raise ValueError(f"max_total must be at least {2 * SHAREGPT_MIN_LEN}, got {max_total}")
    rng = random.Random(seed)
    max_input = min(SHAREGPT_MAX_INPUT, max_total - SHAREGPT_MIN_LEN)
    if mean_input + mean_output > max_total / 2:
        raise ValueError(f"max_total ({max_total}) is too small for mean lengths {mean_input:.0f} + {mean_output:.0f}")
    # Fitted so that the means hold after each length's own filter; the prompt + output cap
    # removes only the far tail on top of that.
    mu_in = fit_lognormal_mu(mean_input, SHAREGPT_SIGMA_INPUT, SHAREGPT_MIN_LEN - 0.5, max_input + 0.5)
    mu_out = fit_lognormal_mu(mean_output, SHAREGPT_SIGMA_OUTPUT, SHAREGPT_MIN_LEN - 0.5,
                              max_total - SHAREGPT_MIN_LEN + 0.5)
    pairs = []
    while len(pairs) < num_prompts:
        n_in = round(rng.lognormvariate(mu_in, SHAREGPT_SIGMA_INPUT))
        n_out = round(rng.lognormvariate(mu_out, SHAREGPT_SIGMA_OUTPUT))
        if SHAREGPT_MIN_LEN <= n_in <= max_input and n_out >= SHAREGPT_MIN_LEN and n_in + n_out <= max_total:
            pairs.append((n_in, n_out))
    return pairs


def sharegpt_like_dataset(pool: Sequence[int], num_prompts: int, seed: int = 0,
                          max_total: int = SHAREGPT_MAX_TOTAL) -> list[SampleRequest]:
    rng = random.Random(seed + 1)  # ids independent of the lengths' stream
    return [SampleRequest(_ids(rng, pool, n_in), n_out)
            for n_in, n_out in sharegpt_like_lengths(num_prompts, seed, max_total=max_total)]


def prefix_shared_dataset(pool: Sequence[int], num_prompts: int, num_prefixes: int, prefix_len: int,
                          suffix_len: int, output_len: int, seed: int = 0) -> list[SampleRequest]:
    for name, value in (("num_prompts", num_prompts), ("num_prefixes", num_prefixes), ("prefix_len", prefix_len),
                        ("suffix_len", suffix_len), ("output_len", output_len)):
        _positive(name, value)
    rng = random.Random(seed)
    prefixes = [_ids(rng, pool, prefix_len) for _ in range(num_prefixes)]
    return [SampleRequest(prefixes[i % num_prefixes] + _ids(rng, pool, suffix_len), output_len)
            for i in range(num_prompts)]


def edit_like_dataset(tokenizer, num_prompts: int, block_len: int, output_len: int,
                      seed: int = 0) -> list[SampleRequest]:
    """Prompts holding a block of about `block_len` tokens to rewrite; `output_len` caps the answer."""
    from pagellm.benchmarks.edit_like import edit_prompt

    for name, value in (("num_prompts", num_prompts), ("input_len", block_len), ("output_len", output_len)):
        _positive(name, value)
    if tokenizer is None:
        raise ValueError("dataset 'edit-like' is text: it needs the model's tokenizer (not --skip-tokenizer-init)")

    def encode(text: str) -> list[int]:  # as `LLM.generate` encodes a text prompt
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(seed)
    return [SampleRequest(encode(edit_prompt(rng, lambda t: len(encode(t)), block_len)[0]), output_len)
            for _ in range(num_prompts)]


def make_dataset(name: str, pool: Sequence[int], *, num_prompts: int, input_len: int = 128, output_len: int = 128,
                 num_prefixes: int = 8, prefix_len: int = 1024, suffix_len: int = 64, seed: int = 0,
                 max_total: int = SHAREGPT_MAX_TOTAL, tokenizer=None) -> list[SampleRequest]:
    """The dataset `name` (one of DATASETS). `input_len` is used by `random` and `edit-like` (the
    block's size); the prefix fields by `prefix-shared`; `output_len` by those three; `max_total`
    caps sharegpt-like's prompt + output; `tokenizer` is needed by `edit-like`."""
    if name == "edit-like":
        return edit_like_dataset(tokenizer, num_prompts, input_len, output_len, seed)
    if not pool:
        raise ValueError("the token-id pool is empty")
    if name == "random":
        return random_dataset(pool, num_prompts, input_len, output_len, seed)
    if name == "sharegpt-like":
        return sharegpt_like_dataset(pool, num_prompts, seed, max_total=max_total)
    if name == "prefix-shared":
        return prefix_shared_dataset(pool, num_prompts, num_prefixes, prefix_len, suffix_len, output_len, seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
