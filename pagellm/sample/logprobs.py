"""Logprobs and ranks of chosen (or target) tokens plus the top-k, and their host-side lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobsTensors:
    token_ids: torch.Tensor  # [N, K+1] long: column 0 is the chosen/target token, then the top-K by rank
    logprobs: torch.Tensor  # [N, K+1] float32
    ranks: torch.Tensor  # [N] long: rank of the chosen/target token (1 = most likely)


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


def rows_to_lists(t: LogprobsTensors, rows: list[int], k: int) -> list[tuple[list[int], list[float], int]]:
    """Rows of `t` (their first k + 1 columns) as host lists, `worker.outputs.LogprobsLists`: one copy per field."""
    ids = t.token_ids[rows, : k + 1].tolist()
    lps = t.logprobs[rows, : k + 1].tolist()
    ranks = t.ranks[rows].tolist()
    return [(i, l, r) for i, l, r in zip(ids, lps, ranks)]
