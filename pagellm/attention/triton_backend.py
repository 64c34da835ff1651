"""Paged attention with Triton kernels: the GPU backend.

Same cache layout and semantics as the torch backend (which stays the reference): new K/V are
written by slot, then one kernel launch covers every request of the step, prompt chunks and
decodes alike. Only device tensors and static host bounds are read, so decode steps can be
captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, AttentionMetadataBuilder
from pagellm.attention.triton_reshape_and_cache import reshape_and_cache, reshape_and_cache_quantized
from pagellm.attention.triton_unified_attention import unified_attention


@dataclass
class TritonAttentionMetadata:
    """What the Triton kernels read: device tensors and two host bounds (CUDA-graph safe)."""

    slot_mapping: torch.Tensor
    query_start_loc_tensor: torch.Tensor
    seq_lens_tensor: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    # The bound the split-KV heuristic reads: the step's longest sequence, or max_model_len for a
    # decode-only step on CUDA (see TritonMetadataBuilder).
    max_seq_len: int


class TritonMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, max_model_len: int, device: torch.device) -> None:
        self.max_model_len = max_model_len
        self.device = torch.device(device)

    def build(self, common: AttentionMetadata) -> TritonAttentionMetadata:
        bound = common.max_seq_len
        if common.max_query_len == 1 and self.device.type == "cuda":
            # Decode-only: split-KV is chosen from the batch shape alone, as in the captured CUDA
            # graphs, so eager and graph decode run the same kernels.
            bound = self.max_model_len
        return TritonAttentionMetadata(common.slot_mapping, common.query_start_loc_tensor, common.seq_lens_tensor,
                                       common.block_tables, common.max_query_len, bound)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: Optional[torch.device] = None) -> None:
        # The split-KV heuristic sizes its grid against the SM count.
        self.num_sms = 132
        if device is not None and device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def metadata_builder(self, max_model_len: int, device: torch.device) -> TritonMetadataBuilder:
        return TritonMetadataBuilder(max_model_len, device)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        if block_size < 16:
            # One KV block is one tile of the kernel's dot products, which need at least 16 columns.
            raise ValueError(f"EngineConfig.block_size: the Triton attention backend needs block_size >= 16, "
                             f"got {block_size}; use a larger block size or attention_backend='torch'")
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata | TritonAttentionMetadata, scale: float,
                sliding_window: int | None = None, logit_softcap: float | None = None,
                kv_quant=None) -> torch.Tensor:
        if metadata.query_start_loc_tensor is None:
            raise ValueError("the Triton backend needs AttentionMetadata.query_start_loc_tensor (use build_metadata)")
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if kv_quant is None:
            reshape_and_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        else:
            reshape_and_cache_quantized(k, v, k_cache, v_cache, metadata.slot_mapping, kv_quant)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return unified_attention(
            q, k_cache, v_cache, out, metadata.query_start_loc_tensor, metadata.seq_lens_tensor,
            metadata.block_tables, metadata.max_query_len, metadata.max_seq_len, scale,
            sliding_window=sliding_window, logit_softcap=logit_softcap, num_sms=self.num_sms, kv_quant=kv_quant)
