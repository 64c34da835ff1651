"""The attention-backend interface and the per-step metadata every backend receives.

The runner lays the step out as one flat token batch: request i owns query tokens
`query_start_loc[i]:query_start_loc[i+1]`, has `context_lens[i]` tokens already in the
KV cache before this step and `seq_lens[i]` after it. Its blocks are `block_tables[i]`.

The host-side lists serve the torch backend; GPU kernels read only the device tensors
(`query_start_loc_tensor`, `seq_lens_tensor`, `block_tables`, `slot_mapping`) and the two
host bounds `max_query_len` / `max_seq_len`, so a CUDA graph can replay them with new contents.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    query_start_loc: list[int]  # [B+1] prefix sums of per-request query lengths
    seq_lens: list[int]  # [B] tokens in context after this step (cached + new)
    context_lens: list[int]  # [B] tokens cached before this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens_tensor: torch.Tensor  # [B] int32, same as seq_lens, on the device
    # Requests whose query is one token (decodes), handled as one vectorised batch.
    decode_indices: list[int]
    prefill_indices: list[int]
    query_start_loc_tensor: Optional[torch.Tensor] = None  # [B+1] int32 on the device
    max_query_len: int = 0  # upper bounds: pick kernel tile shapes and the split-KV count
    max_seq_len: int = 0

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(abc.ABC):
    """Owns the KV cache layout and the attention math; knows nothing about requests."""

    name: str = "abstract"
    # True when forward() does no host sync and no data-dependent Python branching on the
    # decode path, so the runner may capture decode steps in CUDA graphs.
    supports_cuda_graphs: bool = False

    @staticmethod
    @abc.abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor; K and V are stacked on dim 0."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, sliding_window: int | None = None,
                logit_softcap: float | None = None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]. Writes k/v into the cache by slot, returns [T, Hq, D]."""


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Lays out the flat batch (positions are context_len .. context_len + query_len - 1 per request)."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    query_start_loc = [0]
    for qlen in query_lens:
        query_start_loc.append(query_start_loc[-1] + qlen)
    max_blocks = max((len(b) for b in block_ids), default=0)
    table = torch.zeros((len(block_ids), max(max_blocks, 1)), dtype=torch.int32)
    for i, blocks in enumerate(block_ids):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    # Slot of every new token, computed with tensor ops rather than a Python loop per token.
    lens = torch.tensor(query_lens, dtype=torch.long)
    req_index = torch.repeat_interleave(torch.arange(len(query_lens)), lens)
    starts = torch.tensor(query_start_loc[:-1], dtype=torch.long)
    positions = torch.tensor(context_lens, dtype=torch.long)[req_index] + torch.arange(int(lens.sum())) - starts[req_index]
    slots = table[req_index, positions // block_size].long() * block_size + positions % block_size
    decode_indices = [i for i, q in enumerate(query_lens) if q == 1]
    prefill_indices = [i for i, q in enumerate(query_lens) if q > 1]
    return AttentionMetadata(
        slot_mapping=slots.to(device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        context_lens=list(context_lens),
        block_tables=table.to(device),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        decode_indices=decode_indices,
        prefill_indices=prefill_indices,
        query_start_loc_tensor=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
