"""Batched LoRA in torch: `out[t] += (x[t] @ A[s]^T) @ B[s]` for each token t with slot s = slot[t] >= 0.

A layer's slot weights are stacked: `a` [S, R, in] (shrink), `b` [S, R, out] (expand, already
transposed and scaled; a merged layer's slices sit block-diagonally in it). Tokens with slot -1
(the base model) get nothing added.

`LoRAMapping` is built once per step (tokens grouped by slot, padded to the largest group) and read
by every layer, so a layer's LoRA is a gather, two batched matmuls and a scatter-add whatever the
mix of requests: no Python loop over requests or slots in the layers. When every token uses one
slot it is two plain matmuls. `masked_dense` (every token against every slot, masked) is the
alternative measured against it (see docs/architecture.md, "LoRA").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LoRAMapping:
    num_tokens: int
    token_slots: torch.Tensor  # [T] long, -1: no adapter
    uniform_slot: Optional[int]  # every token uses this slot (then nothing else is needed)
    slots: torch.Tensor  # [G] long: the slots in use, one group each
    gather_index: torch.Tensor  # [G * L] long: the tokens of group g at [g * L, g * L + count_g), then 0s
    pad_mask: torch.Tensor  # [G, L, 1] in the model dtype: 1 for real tokens, 0 for padding
    group_len: int  # L
    active: tuple[int, ...] = ()  # the slots in use (host side: a layer no active slot targets skips LoRA)


def build_mapping(request_slots: list[int], query_lens: list[int], dtype: torch.dtype,
                  device: torch.device) -> Optional[LoRAMapping]:
    """The step's mapping from each request's slot (-1: none) and scheduled token count; None when
    no token uses an adapter (the layers then skip LoRA entirely)."""
    if all(s < 0 for s in request_slots):
        return None
    counts = torch.tensor(query_lens, dtype=torch.long)
    token_slots = torch.repeat_interleave(torch.tensor(request_slots, dtype=torch.long), counts)
    num_tokens = int(token_slots.shape[0])
    active = sorted({s for s in request_slots if s >= 0})
    uniform = active[0] if len(active) == 1 and min(request_slots) >= 0 else None
    members = [torch.nonzero(token_slots == s).squeeze(1) for s in active]
    group_len = max(int(m.shape[0]) for m in members)
    gather = torch.zeros(len(active), group_len, dtype=torch.long)
    mask = torch.zeros(len(active), group_len, 1, dtype=dtype)
    for g, m in enumerate(members):
        gather[g, :m.shape[0]] = m
        mask[g, :m.shape[0]] = 1
    return LoRAMapping(num_tokens, token_slots.to(device), uniform, torch.tensor(active, device=device),
                       gather.view(-1).to(device), mask.to(device), group_len, tuple(active))


def add_lora_grouped(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     mapping: LoRAMapping) -> torch.Tensor:
    """out += LoRA(x) by slot groups (gather, bmm shrink, bmm expand, index_add); returns out."""
    if mapping.uniform_slot is not None:
        s = mapping.uniform_slot
        return out.addmm_(x @ a[s].t(), b[s])
    groups = mapping.slots.shape[0]
    xg = x.index_select(0, mapping.gather_index).view(groups, mapping.group_len, x.shape[-1])
    ag, bg = (a, b) if groups == a.shape[0] else (a.index_select(0, mapping.slots), b.index_select(0, mapping.slots))
    shrunk = torch.bmm(xg, ag.transpose(1, 2)) * mapping.pad_mask  # padding rows add zeros below
    expanded = torch.bmm(shrunk, bg)
    return out.index_add_(0, mapping.gather_index, expanded.view(-1, out.shape[-1]))


def add_lora_masked_dense(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          mapping: LoRAMapping) -> torch.Tensor:
    """out += LoRA(x), every token against every slot with the others masked out (S times the flops)."""
    slots, rank = a.shape[0], a.shape[1]
    onehot = torch.zeros(x.shape[0], slots, 1, dtype=x.dtype, device=x.device)
    valid = mapping.token_slots >= 0
    onehot[valid, mapping.token_slots[valid]] = 1
    shrunk = (x @ a.reshape(slots * rank, -1).t()).view(-1, slots, rank) * onehot
    return out.addmm_(shrunk.view(x.shape[0], -1), b.reshape(slots * rank, -1))


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       token_slots: torch.Tensor) -> torch.Tensor:
    """Token by token (tests only)."""
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            out[t] += (x[t] @ a[s].t()) @ b[s]
    return out


def embedding_lora(ids: torch.Tensor, a_rows: torch.Tensor, b: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    """The embedding's LoRA term per token: `a_rows` [S, vocab, R] (A transposed, looked up by id),
    `b` [S, R, hidden]; zero for tokens without an adapter. Once per step, so a loop over the
    (at most max_loras) slots in use is fine here."""
    out = torch.zeros(ids.shape[0], b.shape[-1], dtype=b.dtype, device=b.device)
    for s in (mapping.slots.tolist() if mapping.uniform_slot is None else [mapping.uniform_slot]):
        rows = torch.nonzero(mapping.token_slots == s).squeeze(1)
        out.index_copy_(0, rows, a_rows[s].index_select(0, ids.index_select(0, rows)) @ b[s])
    return out
