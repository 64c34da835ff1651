"""CPU attention with a C++ paged decode kernel (`pagellm/ops/csrc/cpu_ops.cpp`; for a quantized
KV cache, `kv_quant_ops.cpp`).

Decodes read K/V in place through the block tables: the torch backend gathers every decode
request's context into a padded copy first, and that copy was a fifth of a batch-64 decode
step on a 2-core CPU. Prompt chunks are compute-bound and keep the torch backend's SDPA path.
"""

from __future__ import annotations

import torch

from pagellm.attention.backend import AttentionMetadata
from pagellm.attention.kv_quant import KVQuant
from pagellm.attention.torch_backend import TorchAttentionBackend, write_cache
from pagellm.ops.kv_quant_cpu import load_kv_quant_ops, quantized_decode_attention


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    @staticmethod
    def _write_cache(k, v, k_cache, v_cache, slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
        # One C++ pass for a plain or an fp8 cache (the backend exists only when the kernels built);
        # an int8 cache quantizes as it writes, in kv_quant's own code.
        if not slot_mapping.numel():
            return
        if kv_quant is None and (k.dtype is k_cache.dtype or k.dtype is torch.float32):
            torch.ops.pagellm_cpu.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
            return
        if kv_quant is not None and kv_quant.kind == "fp8" and k.dtype is torch.float32 and v.dtype is torch.float32:
            torch.ops.pagellm_cpu.write_kv_cache_fp8(k, v, k_cache, v_cache, slot_mapping, kv_quant.scale(0),
                                                     kv_quant.scale(1))
            return
        write_cache(k, v, k_cache, v_cache, slot_mapping, kv_quant)

    def _decode(self, q, k_cache, v_cache, md: AttentionMetadata, scale, sliding_window, logit_softcap,
                out, kv_quant=None) -> None:
        if kv_quant is not None and not load_kv_quant_ops():
            super()._decode(q, k_cache, v_cache, md, scale, sliding_window, logit_softcap, out, kv_quant)
            return
        idx = md.decode_indices
        if len(idx) == md.num_reqs and q.is_contiguous() and out.is_contiguous():
            # A pure decode step: token i belongs to request i, so the kernel works in place.
            decode_attention(out, q, k_cache, v_cache, md.block_tables, md.seq_lens_tensor, scale,
                             sliding_window, logit_softcap, kv_quant)
            return
        token_idx = torch.tensor([md.query_start_loc[i] for i in idx], device=q.device)
        req_idx = torch.tensor(idx, device=q.device)
        result = torch.empty((len(idx), *q.shape[1:]), dtype=q.dtype, device=q.device)
        decode_attention(result, q[token_idx].contiguous(), k_cache, v_cache, md.block_tables[req_idx].contiguous(),
                         md.seq_lens_tensor[req_idx].contiguous(), scale, sliding_window, logit_softcap, kv_quant)
        out[token_idx] = result


def decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int | None,
                     logit_softcap: float | None, kv_quant: KVQuant | None = None) -> None:
    """out/q: [B, Hq, D] contiguous; caches [blocks, block_size, Hkv, D]; tables [B, n] and lens [B] int32.
    A quantized cache (`kv_quant`) goes to the kernels of `csrc/kv_quant_ops.cpp`, which dequantize as they read."""
    if kv_quant is not None:
        quantized_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                   logit_softcap, kv_quant)
        return
    torch.ops.pagellm_cpu.paged_decode_attention(out, q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                 sliding_window or 0, logit_softcap or 0.0)
