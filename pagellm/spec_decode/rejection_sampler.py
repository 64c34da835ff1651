"""Rejection sampling of proposed tokens against the target model (exact in distribution).

For each request, the target model scored k proposals in one forward, giving k + 1 target
distributions p_0..p_k (already through penalties, logit bias, top-k/top-p/min-p: the same
processing as without speculation). Proposal j (drawn from the proposer's q_j) is accepted with
probability min(1, p_j(x) / q_j(x)); at the first rejection a token is drawn from the normalized
residual (p_j - q_j)+ and the rest are dropped; when all are accepted a bonus token is drawn
from p_k. Each emitted token is then distributed exactly as the target's would be.

Deterministic proposers (n-gram, suffix) pass no draft probabilities: q_j is one-hot at the
proposal, so acceptance is with probability p_j(x) and the residual is p_j without x. Greedy
rows pass one-hot target rows (at the argmax), which makes acceptance exact token matching (a step
whose rows are all greedy skips the distributions: `verify.greedy_verify`, same helpers).
Everything is vectorised over the batch; random draws come from one generator (the model runner
calls it once per seeded request with that request's generator: `verify.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

PAD_TOKEN = -1  # output slots after the first rejection


@dataclass
class RejectionOutput:
    token_ids: torch.Tensor  # [B, k + 1]: accepted proposals, then the recovered/bonus token, then PAD_TOKEN
    num_accepted: torch.Tensor  # [B]: proposals accepted (the row emits num_accepted + 1 tokens)


def one_hot_argmax(probs: torch.Tensor) -> torch.Tensor:
    """Greedy target rows: all mass on the most likely token (first one on ties, as argmax)."""
    return torch.zeros_like(probs).scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)


def accepted_prefix_length(accepted: torch.Tensor) -> torch.Tensor:
    """[B] length of each row's run of accepted proposals from the start ([B, k] bool)."""
    return accepted.long().cumprod(dim=1).sum(dim=1)


def emitted_tokens(drafts: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
    """[B, k + 1]: each row's accepted proposals, then `next_token` (recovered or bonus), then PAD_TOKEN."""
    batch, k = drafts.shape
    positions = torch.arange(k, device=drafts.device)
    out = torch.full((batch, k + 1), PAD_TOKEN, dtype=torch.long, device=drafts.device)
    keep = positions.unsqueeze(0) < num_accepted.unsqueeze(1)
    out[:, :k] = torch.where(keep, drafts, out[:, :k])
    out[torch.arange(batch, device=drafts.device), num_accepted] = next_token
    return out


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [B, k] long (entries past num_draft are ignored)
    num_draft: torch.Tensor,  # [B] long, 0..k proposals per row
    target_probs: torch.Tensor,  # [B, k + 1, V] normalized target distributions
    draft_probs: Optional[torch.Tensor] = None,  # [B, k, V]; None: one-hot at the proposals
    generator: Optional[torch.Generator] = None,
) -> RejectionOutput:
    batch, k = draft_token_ids.shape
    device = target_probs.device
    positions = torch.arange(k, device=device)
    valid = positions.unsqueeze(0) < num_draft.unsqueeze(1)  # [B, k]
    drafts = torch.where(valid, draft_token_ids, torch.zeros_like(draft_token_ids))

    p_at_draft = target_probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k]
    if draft_probs is None:
        q_at_draft = torch.ones_like(p_at_draft)
    else:
        q_at_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    uniform = torch.rand(batch, k, device=device, generator=generator, dtype=target_probs.dtype)
    # u < p/q written without the division (q can be 0 for a proposal its own model ruled out)
    accepted = (uniform * q_at_draft < p_at_draft) & valid
    num_accepted = accepted_prefix_length(accepted)

    # The distribution the next token comes from: the residual at the first rejection, else p_k.
    rows = torch.arange(batch, device=device)
    at = num_accepted  # index of the emitted non-proposal token
    target_at = target_probs[rows, at]  # [B, V]
    rejected = num_accepted < num_draft
    if draft_probs is None:
        q_at = torch.zeros_like(target_at)
        reject_rows = rejected.nonzero().squeeze(-1)
        q_at[reject_rows, drafts[reject_rows, at[reject_rows]]] = 1.0
    else:
        q_at = torch.where(rejected.unsqueeze(-1), draft_probs[rows, at.clamp(max=k - 1)], torch.zeros_like(target_at))
    residual = (target_at - q_at).clamp_(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q leaves no residual (a rejection then has probability 0; guard against rounding)
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), target_at)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    return RejectionOutput(token_ids=emitted_tokens(drafts, num_accepted, next_token), num_accepted=num_accepted)
