"""Turns one step's logits into next tokens (and their logprobs), batched over requests.

The model runner hands over one float32 row of logits per request that samples this step,
plus a `SamplingMetadata` built from those requests once per step. Everything below works on
the whole batch at once; Python only loops over rows while building the metadata.

Order of operations (vLLM v1 / OpenAI / Hugging Face meanings):

1. Logprobs are taken from the RAW logits (`log_softmax` in float32), before any processing,
   as vLLM does by default. The rank of a token is 1 + the number of tokens with a strictly
   higher logprob (1 = most likely).
2. Logits processors, in this order:
   - `logit_bias`: the bias is added to the token's logit.
   - `allowed_token_ids`: every other token is set to -inf.
   - `bad_words` (token-id sequences in `params._bad_words_token_ids`): a single-token bad word
     is always banned; for a longer one, its last token is banned when the output so far ends
     with the rest of it. Only the generated output is matched, not the prompt.
   - `min_tokens`: while fewer than `min_tokens` tokens have been generated, the EOS ids
     (unless `ignore_eos`) and `stop_token_ids` are banned.
   - `repetition_penalty` (HF/CTRL): for every token seen in the prompt OR the output, a positive
     logit is divided by the penalty, a negative one multiplied by it.
   - `frequency_penalty`: minus `count_in_output * frequency_penalty`.
   - `presence_penalty`: minus `presence_penalty` if the token occurs in the output.
3. Greedy rows (`temperature < 1e-5` or `top_k == 1`) take the argmax of the processed logits
   (the first index on ties, so `top_k=1` and `temperature=0` agree exactly).
4. Other rows: divide by `temperature`; `top_k` keeps the tokens whose logit is >= the k-th
   largest (ties at the boundary are kept, as in HF); `top_p` keeps the smallest prefix of the
   distribution left by top-k, sorted by probability, whose mass reaches `top_p` (the top token
   always stays; tokens tied with the last one kept stay too); `min_p` drops tokens whose
   probability is below `min_p * max_probability`. Then one token is drawn by the exponential
   race `argmax(probs / q)`, with `q ~ Exp(1)` (drawn as `-log(U)`, `U ~ Uniform[0, 1)`) for
   every vocabulary entry, which picks token i with probability `probs[i] / sum(probs)`. A row
   whose request has a seed draws its `q` from its own generator (on the logits' device), so a
   seeded request gets the same tokens whatever else shares the batch. Greedy rows draw
   nothing, so they never advance a generator.

Token ids in `logit_bias` / `allowed_token_ids` outside the vocabulary are a `ValueError`;
EOS / stop / bad-word ids past the logits width are ignored (they cannot be sampled anyway).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# How many of the most likely tokens top-p looks at, widening step by step, before falling
# back to a full sort (CPU): topk over 4,096 of 49,152 costs about a fifth of a full sort.
_TOP_P_WINDOWS = (256, 4096)


@dataclass
class SamplingRow:
    """What the runner knows about one row of the logits this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step
    eos_token_ids: set[int]  # the model's EOS ids; ignored when params.ignore_eos
    generator: Optional[torch.Generator] = None  # the request's own RNG when params.seed is set


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # [N, K+1] long: column 0 is the chosen/target token, then the top-K by rank
    logprobs: torch.Tensor  # [N, K+1] float32
    ranks: torch.Tensor  # [N] long: rank of the chosen/target token (1 = most likely)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] long
    logprobs: Optional[LogprobsTensors]  # when any row asked for logprobs (K = the largest request)


@dataclass
class SamplingMetadata:
    """Per-step tensors for a batch of rows. Fields left `None` mean "nobody asked for this"."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # Random (non-greedy) rows; indices into the batch, None when every row is random.
    random_rows: Optional[torch.Tensor]
    temperature: Optional[torch.Tensor]  # [R] float, for the random rows
    # top-k / top-p: applied to a subset of the random rows (indices into them; None = all of them).
    trunc_rows: Optional[torch.Tensor]
    top_k: Optional[torch.Tensor]  # [T] long; vocab_size where a row has no top-k
    max_top_k: int
    top_p: Optional[torch.Tensor]  # [T] float; 1.0 where a row has no top-p
    min_p: Optional[torch.Tensor]  # [R] float; 0.0 where off
    # (index into the random rows, generator) for every seeded random row.
    generators: list[tuple[int, torch.Generator]]
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # rows, cols, values
    disallowed_mask: Optional[torch.Tensor]  # [B, V] bool, True = banned by allowed_token_ids
    banned: Optional[tuple[torch.Tensor, torch.Tensor]]  # rows, cols (bad_words + min_tokens)
    # Penalties touch only the tokens a row has seen, so they are kept sparse: (rows, cols, value)
    # over the distinct (row, token) pairs of the rows that use them.
    repetition: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # value = the penalty; prompt + output
    output_penalty: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # value = count * freq + presence
    max_num_logprobs: Optional[int]  # K for the batch, None when no row asked

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> "SamplingMetadata":
        if not rows:
            raise ValueError("SamplingMetadata.build: needs at least one row")
        if vocab_size < 1:
            raise ValueError(f"SamplingMetadata.build: vocab_size must be >= 1, got {vocab_size}")
        device = torch.device(device)
        num_rows = len(rows)
        params = [r.params for r in rows]
        for p in params:
            if p.logit_bias or p.allowed_token_ids is not None:
                p.validate_vocab(vocab_size)

        def on_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        greedy = [p.greedy for p in params]
        random_idx = [i for i, g in enumerate(greedy) if not g]
        all_greedy = not random_idx
        all_random = len(random_idx) == num_rows

        temperature = top_k = top_p = min_p = trunc_rows = None
        max_top_k = vocab_size
        generators: list[tuple[int, torch.Generator]] = []
        if random_idx:
            rparams = [params[i] for i in random_idx]
            temperature = on_device([p.temperature for p in rparams], torch.float32)
            trunc = [j for j, p in enumerate(rparams) if (0 < p.top_k < vocab_size) or p.top_p < 1.0]
            if trunc:
                ks = [min(rparams[j].top_k, vocab_size) or vocab_size for j in trunc]
                max_top_k = max(ks)
                if any(k < vocab_size for k in ks):
                    top_k = on_device(ks, torch.long)
                if any(rparams[j].top_p < 1.0 for j in trunc):
                    top_p = on_device([rparams[j].top_p for j in trunc], torch.float32)
                if len(trunc) < len(rparams):
                    trunc_rows = on_device(trunc, torch.long)
            if any(p.min_p > 0.0 for p in rparams):
                min_p = on_device([p.min_p for p in rparams], torch.float32)
            generators = [
                (j, rows[i].generator) for j, i in enumerate(random_idx) if rows[i].generator is not None
            ]

        # -- sparse edits: logit_bias and bans --------------------------------------
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_vals: list[float] = []
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        allowed_rows: list[int] = []
        allowed_cols: list[int] = []
        for i, (row, p) in enumerate(zip(rows, params)):
            if p.logit_bias:
                bias_rows += [i] * len(p.logit_bias)
                bias_cols += list(p.logit_bias.keys())
                bias_vals += list(p.logit_bias.values())
            if p.allowed_token_ids is not None:
                allowed_rows += [i] * len(p.allowed_token_ids)
                allowed_cols += p.allowed_token_ids
            banned = _banned_tokens(row, vocab_size)
            ban_rows += [i] * len(banned)
            ban_cols += banned

        logit_bias = None
        if bias_rows:
            logit_bias = (
                on_device(bias_rows, torch.long),
                on_device(bias_cols, torch.long),
                on_device(bias_vals, torch.float32),
            )
        disallowed_mask = None
        if allowed_rows:
            restricted = sorted(set(allowed_rows))
            mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
            mask[restricted] = True
            mask[allowed_rows, allowed_cols] = False
            disallowed_mask = mask.to(device)
        banned_t = None
        if ban_rows:
            banned_t = (on_device(ban_rows, torch.long), on_device(ban_cols, torch.long))

        # -- penalties: distinct seen tokens (and output counts) of the rows that use them --
        rep_parts: list[tuple[int, torch.Tensor, float]] = []
        out_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, (row, p) in enumerate(zip(rows, params)):
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, dtype=torch.long).unique()
                rep_parts.append((i, seen, p.repetition_penalty))
            if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and row.output_token_ids:
                ids, counts = torch.tensor(row.output_token_ids, dtype=torch.long).unique(return_counts=True)
                delta = counts.to(torch.float32) * p.frequency_penalty + p.presence_penalty
                out_parts.append((i, ids, delta))
        repetition = output_penalty = None
        if rep_parts:
            repetition = _sparse_rows(
                [(i, ids, torch.full((ids.numel(),), pen, dtype=torch.float32)) for i, ids, pen in rep_parts], device
            )
        if out_parts:
            output_penalty = _sparse_rows(out_parts, device)

        asked = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = min(max(asked), vocab_size) if asked else None

        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            random_rows=None if all_random or all_greedy else on_device(random_idx, torch.long),
            temperature=temperature,
            trunc_rows=trunc_rows,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            logit_bias=logit_bias,
            disallowed_mask=disallowed_mask,
            banned=banned_t,
            repetition=repetition,
            output_penalty=output_penalty,
            max_num_logprobs=max_num_logprobs,
        )


def _banned_tokens(row: SamplingRow, vocab_size: int) -> list[int]:
    """Token ids this row may not produce this step (bad_words, then min_tokens)."""
    p = row.params
    out = row.output_token_ids
    banned: list[int] = []
    for word in p._bad_words_token_ids:
        if not word:
            continue
        prefix = word[:-1]
        if len(prefix) <= len(out) and out[len(out) - len(prefix):] == prefix:
            banned.append(word[-1])
    if len(out) < p.min_tokens:
        banned += p.stop_token_ids
        if not p.ignore_eos:
            banned += row.eos_token_ids
    # Ids past the logits width cannot be sampled anyway.
    return [t for t in set(banned) if 0 <= t < vocab_size]


def _sparse_rows(
    parts: list[tuple[int, torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(row, token ids, values)] -> flat (rows, cols, values) on `device`."""
    rows = torch.cat([torch.full((ids.numel(),), i, dtype=torch.long) for i, ids, _ in parts])
    cols = torch.cat([ids for _, ids, _ in parts])
    values = torch.cat([v for _, _, v in parts])
    return rows.to(device), cols.to(device), values.to(device)


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logit_bias, allowed_token_ids, bad_words/min_tokens bans and penalties. Never edits `logits` in place."""
    m = meta
    if (
        m.logit_bias is None
        and m.disallowed_mask is None
        and m.banned is None
        and m.repetition is None
        and m.output_penalty is None
    ):
        return logits
    logits = logits.clone()
    if m.logit_bias is not None:
        rows, cols, values = m.logit_bias
        logits.index_put_((rows, cols), values, accumulate=True)
    if m.disallowed_mask is not None:
        logits.masked_fill_(m.disallowed_mask, _NEG_INF)
    if m.banned is not None:
        logits[m.banned] = _NEG_INF
    if m.repetition is not None:
        rows, cols, penalty = m.repetition
        seen = logits[rows, cols]
        logits[rows, cols] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if m.output_penalty is not None:
        rows, cols, delta = m.output_penalty
        logits.index_put_((rows, cols), -delta, accumulate=True)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Sets every logit below the row's k-th largest to -inf (ties with the k-th are kept).

    `top_k` is [N] with the vocabulary size for rows without top-k; `max_top_k` is its maximum.
    """
    vocab = logits.shape[-1]
    if max_top_k < vocab:
        kth = logits.topk(max_top_k, dim=-1).values.gather(-1, (top_k - 1).unsqueeze(-1))
        return logits.masked_fill(logits < kth, _NEG_INF)
    # Some rows only truncate by top-p (k = vocab): a topk over the whole vocabulary would be a
    # full sort, so take the k-th value only for the rows that really limit k.
    limited = (top_k < vocab).nonzero().squeeze(-1)
    if limited.numel() == 0:
        return logits
    ks = top_k[limited]
    kth = torch.full((logits.shape[0], 1), _NEG_INF, dtype=logits.dtype, device=logits.device)
    kth[limited] = logits[limited].topk(int(ks.max()), dim=-1).values.gather(-1, (ks - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes the tokens outside each row's nucleus; `top_p` is [N], 1.0 for rows without top-p.

    The nucleus is the smallest prefix of the tokens sorted by probability whose mass reaches
    top_p; the top token always stays, and tokens tied with the last one kept stay too. The
    result is not renormalised (the exponential race does not need it).
    """
    vocab = probs.shape[-1]
    # A full sort of the vocabulary is the slow part on CPU, and a nucleus usually sits in the
    # first few hundred tokens: look there first and sort only the rows whose nucleus does not.
    windows = [w for w in _TOP_P_WINDOWS if w < vocab] if not probs.is_cuda else []
    threshold = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    pending = (top_p < 1.0).nonzero().squeeze(-1)
    for window in windows + [vocab]:
        if pending.numel() == 0:
            break
        rows = probs[pending]
        head = rows.sort(dim=-1, descending=True).values if window == vocab else rows.topk(window, dim=-1).values
        found, covered = _nucleus_threshold(head, top_p[pending])
        if window == vocab:
            covered = torch.ones_like(covered)
        threshold[pending[covered]] = found[covered]
        pending = pending[~covered]
    threshold = torch.where(top_p < 1.0, threshold, torch.zeros_like(threshold))
    return probs.masked_fill(probs < threshold.unsqueeze(-1), 0.0)


def _nucleus_threshold(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability of the last nucleus token, whether the nucleus ends inside `sorted_probs`) per row."""
    inclusive = sorted_probs.cumsum(dim=-1)
    # Mass strictly before each position; shifting keeps it exactly monotone.
    before = torch.cat([torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], dim=-1)
    num_kept = (before < top_p.unsqueeze(-1)).sum(dim=-1, keepdim=True).clamp_(min=1)  # NaN rows (extreme inputs) count 0
    threshold = sorted_probs.gather(-1, num_kept - 1).squeeze(-1)
    return threshold, inclusive[:, -1] >= top_p


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens whose probability is below min_p times the row's largest; `min_p` is [N]."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    return probs.masked_fill(probs < threshold, 0.0)


def compute_logprobs_tensors(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Logprob and rank of `target_ids` under `logits` (raw, one row per target) plus the top-k tokens."""
    if logits.dim() != 2 or target_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"compute_logprobs_tensors: expected logits [N, V] and target_ids [N], "
            f"got {tuple(logits.shape)} and {tuple(target_ids.shape)}"
        )
    vocab = logits.shape[1]
    if not 0 <= k <= vocab:
        raise ValueError(f"compute_logprobs_tensors: k must be in [0, {vocab}], got {k}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = target_ids.long().unsqueeze(-1)
    target_lp = logprobs.gather(-1, target)
    ranks = (logprobs > target_lp).sum(dim=-1) + 1
    token_ids, token_lps = target, target_lp
    if k > 0:
        top_lps, top_ids = logprobs.topk(k, dim=-1)
        token_ids = torch.cat([target, top_ids], dim=-1)
        token_lps = torch.cat([target_lp, top_lps], dim=-1)
    return LogprobsTensors(token_ids=token_ids, logprobs=token_lps, ranks=ranks)


class Sampler(torch.nn.Module):
    """logits [B, V] + SamplingMetadata -> one token per row (and logprobs when asked)."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != meta.num_rows or logits.shape[1] != meta.vocab_size:
            raise ValueError(
                f"Sampler: logits shape {tuple(logits.shape)} does not match the metadata "
                f"({meta.num_rows} rows, vocab {meta.vocab_size})"
            )
        raw = logits.float()
        processed = apply_logits_processors(raw, meta)

        if meta.all_greedy:
            sampled = processed.argmax(dim=-1)
        elif meta.all_random:
            sampled = self._sample_random(processed, meta)
        else:
            sampled = processed.argmax(dim=-1)
            random_part = processed[meta.random_rows]
            sampled[meta.random_rows] = self._sample_random(random_part, meta)

        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = compute_logprobs_tensors(raw, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the exponential race, over the random rows only."""
        logits = logits / meta.temperature.unsqueeze(-1)
        rows = meta.trunc_rows  # None: top-k/top-p apply to every random row
        if meta.top_k is not None:
            if rows is None:
                logits = apply_top_k(logits, meta.top_k, meta.max_top_k)
            else:
                logits[rows] = apply_top_k(logits[rows], meta.top_k, meta.max_top_k)
        probs = logits.softmax(dim=-1)
        if meta.top_p is not None:
            if rows is None:
                probs = apply_top_p(probs, meta.top_p)
            else:
                probs[rows] = apply_top_p(probs[rows], meta.top_p)
        if meta.min_p is not None:
            probs = apply_min_p(probs, meta.min_p)
        # argmax(p / q) with q ~ Exp(1) picks token i with probability p_i / sum(p), so the row
        # needs no renormalisation after truncation. q = -log(U), U ~ Uniform[0, 1), is Exp(1);
        # on CPU it is several times faster than `exponential_`.
        q = torch.empty_like(probs)
        if len(meta.generators) < q.shape[0]:
            q.uniform_()
        for j, gen in meta.generators:
            q[j].uniform_(generator=gen)
        q.log_().neg_()
        # Guard against a draw of exactly 0 (0/0 = nan would win the argmax).
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)


def bench_sampler(batch: int = 64, vocab: int = 49152, steps: int = 50, device: str = "cpu") -> dict:
    """Median milliseconds per step (metadata build + sampling) for three typical batches."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen).mul_(4.0).to(dev)
    prompt = [torch.randint(0, vocab, (512,), generator=gen).tolist() for _ in range(batch)]
    output = [torch.randint(0, vocab, (128,), generator=gen).tolist() for _ in range(batch)]
    eos = {0}

    def rows_for(kind: str) -> list[SamplingRow]:
        rows = []
        for i in range(batch):
            generator = None
            if kind == "greedy":
                p = SamplingParams(temperature=0.0)
            elif kind == "mixed":
                seed = i if i % 2 == 0 else None
                p = SamplingParams(temperature=0.7 + 0.01 * i, top_p=0.9 if i % 3 else 1.0,
                                   top_k=50 if i % 4 == 0 else 0, seed=seed)
                if seed is not None:
                    generator = torch.Generator(device=dev).manual_seed(seed)
            else:
                p = SamplingParams(temperature=0.8, repetition_penalty=1.1,
                                   frequency_penalty=0.3, presence_penalty=0.2)
            rows.append(SamplingRow(p, prompt[i], output[i], eos, generator))
        return rows

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sampler = Sampler()
    results: dict[str, float] = {}
    for kind in ("greedy", "mixed", "penalties"):
        rows = rows_for(kind)
        times = []
        for _ in range(steps + 2):  # the first two are warm-up
            sync()
            start = time.perf_counter()
            meta = SamplingMetadata.build(rows, vocab, dev)
            sampler(logits, meta)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        results[f"{kind}_ms"] = statistics.median(times[2:])
    results.update(batch=batch, vocab=vocab, steps=steps, device=str(dev))
    return results
