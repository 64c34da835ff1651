"""Per-step sampling tensors for the rows that sample, and the per-request pieces they are built from.

What a request asks for (temperature, top-k/p, min-p, logit bias, allowed ids, which ids
min_tokens bans, its prompt's distinct ids for the repetition penalty) is worked out once, when
the request joins the batch (`RequestSampling.from_row`). Each step only the parts that depend
on the output so far (bad-word and min_tokens bans, penalties) are recomputed; the rest is
gathered from those pieces, and kept as tensors while the same requests sample in the same order
(the steady state of decoding). `SamplingMetadata.build(rows, ...)` is the one-shot form of the
same path, for callers without a persistent batch.

Speculative verification (`SamplingMetadataBuilder.build_speculative`) expands a request with
drafts d_1..d_k into k + 1 rows: row j is the request as if d_1..d_j were already in its output,
so the bans and penalties at every draft position are what a plain step there would apply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from pagellm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the runner knows about one row of the logits this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, before this step
    eos_token_ids: set[int]  # the model's EOS ids; ignored when params.ignore_eos
    generator: Optional[torch.Generator] = None  # the request's own RNG when params.seed is set


@dataclass
class RequestSampling:
    """One request's sampling pieces, computed once when it joins the batch."""

    params: SamplingParams
    output_token_ids: list[int]  # the caller's list: read each step, so appends are seen
    generator: Optional[torch.Generator]
    greedy: bool
    top_k: int  # clamped to the vocabulary; the vocabulary size when off
    truncates: bool  # top-k or top-p limits this row
    min_tokens_ban: list[int]  # stop ids (and EOS unless ignore_eos), banned while output < min_tokens
    prompt_seen: Optional[torch.Tensor]  # distinct prompt ids, only with a repetition penalty

    @classmethod
    def from_row(cls, row: SamplingRow, vocab_size: int) -> "RequestSampling":
        p = row.params
        if p.logit_bias or p.allowed_token_ids is not None:
            p.validate_vocab(vocab_size)
        ban = list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.eos_token_ids))
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_token_ids, dtype=torch.long).unique()
        return cls(p, row.output_token_ids, row.generator, p.greedy, min(p.top_k, vocab_size) or vocab_size,
                   (0 < p.top_k < vocab_size) or p.top_p < 1.0, ban, seen)


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
        """One-shot metadata for `rows` (no state kept between calls)."""
        if not rows:
            raise ValueError("SamplingMetadata.build: needs at least one row")
        if vocab_size < 1:
            raise ValueError(f"SamplingMetadata.build: vocab_size must be >= 1, got {vocab_size}")
        device = torch.device(device)
        reqs = [RequestSampling.from_row(r, vocab_size) for r in rows]
        return cls(**_static_part(reqs, vocab_size, device), **_dynamic_part(reqs, vocab_size, device))


class SamplingMetadataBuilder:
    """Sampling metadata kept across steps: requests are added and removed as the batch changes."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.requests: dict[str, RequestSampling] = {}
        self._static_key: Optional[tuple[str, ...]] = None
        self._static: Optional[dict] = None
        # The same for speculative steps, keyed by (request id, number of drafts) pairs.
        self._spec_key: Optional[tuple[tuple[str, int], ...]] = None
        self._spec_static: Optional[dict] = None

    def add_request(self, req_id: str, row: SamplingRow) -> None:
        self.requests[req_id] = RequestSampling.from_row(row, self.vocab_size)
        # a re-added id (after preemption) has a fresh generator
        self._static_key = self._spec_key = None

    def remove_request(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is not None:
            self._static_key = self._spec_key = None

    def build(self, req_ids: list[str]) -> SamplingMetadata:
        """Metadata for the rows `req_ids`, in that order."""
        if not req_ids:
            raise ValueError("SamplingMetadataBuilder.build: needs at least one row")
        reqs = [self.requests[r] for r in req_ids]
        key = tuple(req_ids)
        if key != self._static_key:
            self._static = _static_part(reqs, self.vocab_size, self.device)
            self._static_key = key
        return SamplingMetadata(**self._static, **_dynamic_part(reqs, self.vocab_size, self.device))

    def build_speculative(self, req_ids: list[str], drafts: Sequence[Sequence[int]]) -> SamplingMetadata:
        """Metadata for verifying drafts: request req_ids[i] becomes len(drafts[i]) + 1 consecutive
        rows, row j with drafts[i][:j] appended to its output so far (only for this build)."""
        if not req_ids or len(req_ids) != len(drafts):
            raise ValueError("SamplingMetadataBuilder.build_speculative: needs one draft list per request, >= 1")
        reqs: list[RequestSampling] = []
        for req_id, draft in zip(req_ids, drafts):
            base = self.requests[req_id]
            reqs.append(base)
            # Copies of the output list: the request's own list must not see unverified drafts.
            reqs += [replace(base, output_token_ids=base.output_token_ids + list(draft[:j]))
                     for j in range(1, len(draft) + 1)]
        key = tuple((r, len(d)) for r, d in zip(req_ids, drafts))
        if key != self._spec_key:
            self._spec_static = _static_part(reqs, self.vocab_size, self.device)
            self._spec_key = key
        return SamplingMetadata(**self._spec_static, **_dynamic_part(reqs, self.vocab_size, self.device))


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def _static_part(reqs: list[RequestSampling], vocab_size: int, device: torch.device) -> dict:
    """Fields that depend only on which requests sample, in which order (not on their output)."""
    num_rows = len(reqs)
    random_idx = [i for i, r in enumerate(reqs) if not r.greedy]
    all_greedy = not random_idx
    all_random = len(random_idx) == num_rows
    fields: dict = dict(num_rows=num_rows, vocab_size=vocab_size, all_greedy=all_greedy, all_random=all_random,
                        random_rows=None if all_random or all_greedy else _on_device(random_idx, torch.long, device),
                        temperature=None, top_k=None, top_p=None, min_p=None, trunc_rows=None, max_top_k=vocab_size,
                        generators=[])
    if random_idx:
        fields.update(_random_part([reqs[i] for i in random_idx], vocab_size, device))
    fields.update(_bias_and_allowed(reqs, vocab_size, device))
    asked = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
    fields["max_num_logprobs"] = min(max(asked), vocab_size) if asked else None
    return fields


def _random_part(rreqs: list[RequestSampling], vocab_size: int, device: torch.device) -> dict:
    """Temperature, truncation and generators of the random rows."""
    out: dict = {"temperature": _on_device([r.params.temperature for r in rreqs], torch.float32, device)}
    trunc = [j for j, r in enumerate(rreqs) if r.truncates]
    if trunc:
        ks = [rreqs[j].top_k for j in trunc]
        out["max_top_k"] = max(ks)
        if any(k < vocab_size for k in ks):
            out["top_k"] = _on_device(ks, torch.long, device)
        if any(rreqs[j].params.top_p < 1.0 for j in trunc):
            out["top_p"] = _on_device([rreqs[j].params.top_p for j in trunc], torch.float32, device)
        if len(trunc) < len(rreqs):
            out["trunc_rows"] = _on_device(trunc, torch.long, device)
    if any(r.params.min_p > 0.0 for r in rreqs):
        out["min_p"] = _on_device([r.params.min_p for r in rreqs], torch.float32, device)
    out["generators"] = [(j, r.generator) for j, r in enumerate(rreqs) if r.generator is not None]
    return out


def _bias_and_allowed(reqs: list[RequestSampling], vocab_size: int, device: torch.device) -> dict:
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    bias_vals: list[float] = []
    allowed_rows: list[int] = []
    allowed_cols: list[int] = []
    for i, r in enumerate(reqs):
        p = r.params
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_cols += list(p.logit_bias.keys())
            bias_vals += list(p.logit_bias.values())
        if p.allowed_token_ids is not None:
            allowed_rows += [i] * len(p.allowed_token_ids)
            allowed_cols += p.allowed_token_ids
    logit_bias = None
    if bias_rows:
        logit_bias = (_on_device(bias_rows, torch.long, device), _on_device(bias_cols, torch.long, device),
                      _on_device(bias_vals, torch.float32, device))
    disallowed_mask = None
    if allowed_rows:
        mask = torch.zeros(len(reqs), vocab_size, dtype=torch.bool)
        mask[sorted(set(allowed_rows))] = True
        mask[allowed_rows, allowed_cols] = False
        disallowed_mask = mask.to(device)
    return {"logit_bias": logit_bias, "disallowed_mask": disallowed_mask}


def _dynamic_part(reqs: list[RequestSampling], vocab_size: int, device: torch.device) -> dict:
    """Fields that depend on the output so far: bans (bad words, min_tokens) and penalties."""
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    rep_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    out_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, r in enumerate(reqs):
        p, output = r.params, r.output_token_ids
        banned = _banned_tokens(r, vocab_size)
        ban_rows += [i] * len(banned)
        ban_cols += banned
        if r.prompt_seen is not None:
            seen = torch.cat([r.prompt_seen, torch.tensor(output, dtype=torch.long)]).unique()
            rep_parts.append((i, seen, torch.full((seen.numel(),), p.repetition_penalty, dtype=torch.float32)))
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and output:
            ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
            out_parts.append((i, ids, counts.to(torch.float32) * p.frequency_penalty + p.presence_penalty))
    banned_t = None
    if ban_rows:
        banned_t = (_on_device(ban_rows, torch.long, device), _on_device(ban_cols, torch.long, device))
    return {"banned": banned_t, "repetition": _sparse_rows(rep_parts, device) if rep_parts else None,
            "output_penalty": _sparse_rows(out_parts, device) if out_parts else None}


def _banned_tokens(req: RequestSampling, vocab_size: int) -> list[int]:
    """Token ids this row may not produce this step (bad_words, then min_tokens)."""
    out = req.output_token_ids
    banned: list[int] = []
    for word in req.params.bad_words_token_ids:
        if not word:
            continue
        prefix = word[:-1]
        if len(prefix) <= len(out) and out[len(out) - len(prefix):] == prefix:
            banned.append(word[-1])
    if len(out) < req.params.min_tokens:
        banned += req.min_tokens_ban
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
