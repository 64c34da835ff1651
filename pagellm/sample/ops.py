"""Logits processors and truncation, batched over rows: the pieces of the sampler that edit logits or probs.

See `pagellm/sample/sampler.py` for the order they run in and what each one means.
"""

from __future__ import annotations

import torch

from pagellm.sample.metadata import SamplingMetadata

_NEG_INF = float("-inf")
# How many of the most likely tokens top-p looks at, widening step by step, before falling
# back to a full sort (CPU): topk over 4,096 of 49,152 costs about a fifth of a full sort.
_TOP_P_WINDOWS = (256, 4096)


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
