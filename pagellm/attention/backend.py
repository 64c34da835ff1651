"""The attention-backend interface and the per-step metadata every backend receives.

The runner lays the step out as one flat token batch: request i owns query tokens
`query_start_loc[i]:query_start_loc[i+1]`, has `context_lens[i]` tokens already in the
KV cache before this step and `seq_lens[i]` after it. Its blocks are `block_tables[i]`.

The host-side lists serve the torch backend; GPU kernels read only the device tensors
(`query_start_loc_tensor`, `seq_lens_tensor`, `block_tables`, `slot_mapping`) and the two
host bounds `max_query_len` / `max_seq_len`, so a CUDA graph can replay them with new contents.

`AttentionMetadata` is the common description of a step. Each backend turns it into what its
kernels read through its `AttentionMetadataBuilder` (the runner calls `build` once per step);
backend-specific choices, such as the Triton split-KV bound, are made there.
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


class AttentionMetadataBuilder:
    """Common step metadata -> the backend's own. The default hands the common metadata on as it is."""

    def build(self, common: AttentionMetadata) -> AttentionMetadata:
        return common


class AttentionBackend(abc.ABC):
    """Owns the KV cache layout and the attention math; knows nothing about requests."""

    name: str = "abstract"
    # True when forward() does no host sync and no data-dependent Python branching on the
    # decode path, so the runner may capture decode steps in CUDA graphs.
    supports_cuda_graphs: bool = False

    def metadata_builder(self, max_model_len: int, device: torch.device) -> AttentionMetadataBuilder:
        """The builder the runner uses for every step of an engine with this backend."""
        return AttentionMetadataBuilder()

    @staticmethod
    @abc.abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor; K and V are stacked on dim 0."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, sliding_window: int | None = None,
                logit_softcap: float | None = None, kv_quant=None) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]. Writes k/v into the cache by slot, returns [T, Hq, D].
        `kv_quant` (a `kv_quant.KVQuant`): the cache is quantized; writes quantize, reads dequantize."""


def flat_positions(query_lens: torch.Tensor, context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, position) of every token of the flat batch: request i's tokens sit at
    positions context_lens[i] .. context_lens[i] + query_lens[i] - 1. Both [T] long, host tensors."""
    req_index = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
    starts = torch.cumsum(query_lens, 0) - query_lens
    positions = context_lens[req_index] + torch.arange(req_index.numel()) - starts[req_index]
    return req_index, positions


def metadata_from_flat(query_lens: list[int], context_lens: list[int], req_index: torch.Tensor,
                       positions: torch.Tensor, block_table: torch.Tensor, block_size: int,
                       device: torch.device) -> AttentionMetadata:
    """Metadata for a laid-out step: `req_index`/`positions` from `flat_positions`, `block_table`
    [B, max_blocks] int32 on the host (padded with 0)."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    query_start_loc = [0]
    for qlen in query_lens:
        query_start_loc.append(query_start_loc[-1] + qlen)
    slots = block_table[req_index, positions // block_size].long() * block_size + positions % block_size
    return AttentionMetadata(
        slot_mapping=slots.to(device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        context_lens=list(context_lens),
        block_tables=block_table.to(device),
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        decode_indices=[i for i, q in enumerate(query_lens) if q == 1],
        prefill_indices=[i for i, q in enumerate(query_lens) if q > 1],
        query_start_loc_tensor=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Lays out the flat batch from plain lists (positions are context_len .. context_len + query_len - 1)."""
    max_blocks = max((len(b) for b in block_ids), default=0)
    table = torch.zeros((len(block_ids), max(max_blocks, 1)), dtype=torch.int32)
    for i, blocks in enumerate(block_ids):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    req_index, positions = flat_positions(torch.tensor(query_lens, dtype=torch.long),
                                          torch.tensor(context_lens, dtype=torch.long))
    return metadata_from_flat(query_lens, context_lens, req_index, positions, table, block_size, device)
