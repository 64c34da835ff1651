"""CPU attention with a C++ paged decode kernel (`pagellm/ops/csrc/cpu_ops.cpp`; for a quantized
KV cache, `kv_quant_ops.cpp`).

Decodes read K/V in place through the block tables: the torch backend gathers every decode
request's context into a padded copy first, and that copy was a fifth of a batch-64 decode
step on a 2-core CPU. Short prompt chunks (speculative verification) run on the same kernel, one
row per query token; longer ones are compute-bound and keep the torch backend's SDPA path.
"""

from __future__ import annotations

import torch

from pagellm.attention.backend import AttentionMetadata
from pagellm.attention.kv_quant import KVQuant
from pagellm.attention.torch_backend import TorchAttentionBackend, write_cache
from pagellm.ops.kv_quant_cpu import load_kv_quant_ops, quantized_decode_attention


# Prompt chunks up to this many query tokens run on the decode kernel too, one row per token:
# speculative verification's 1 + k tokens (k <= 8) is the case. The SDPA path first copies the
# request's whole context out of the block pool; per layer, 5-token chunks ran 1.8x (batch 1) to
# 2.9x (batch 8) faster on the kernel at 400 tokens of context, 2.2x / 1.4x at 4000, and 9-token
# chunks 1.1-2.0x. At 16 tokens and 4000 of context the kernel lost (0.8-1.0x): it reads the
# context once per row. (SmolLM2's 9 / 3 heads of 64, fp32, 2-core Zen 4.)
SHORT_QUERY_ROWS = 9


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, short_query_rows: int = SHORT_QUERY_ROWS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.short_query_rows = short_query_rows

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

    def _attend_rows(self, q, k_cache, v_cache, md: AttentionMetadata, scale, sliding_window, logit_softcap,
                     out, kv_quant=None) -> list[int]:
        if kv_quant is not None and not load_kv_quant_ops():
            return super()._attend_rows(q, k_cache, v_cache, md, scale, sliding_window, logit_softcap, out, kv_quant)
        loc = md.query_start_loc
        short, rest = [], []
        for i in md.prefill_indices:
            (short if loc[i + 1] - loc[i] <= self.short_query_rows else rest).append(i)
        if not short and len(md.decode_indices) == md.num_reqs and q.is_contiguous() and out.is_contiguous():
            # A pure decode step: token i belongs to request i, so the kernel works in place.
            decode_attention(out, q, k_cache, v_cache, md.block_tables, md.seq_lens_tensor, scale,
                             sliding_window, logit_softcap, kv_quant)
            return []
        # One kernel row per query token: a decode's token sees its whole sequence; token t of a short
        # chunk sees context + t + 1 keys, which is the causal mask (its K/V are already written).
        token_idx, req_idx, seq_lens = [], [], []
        for i in md.decode_indices:
            token_idx.append(loc[i])
            req_idx.append(i)
            seq_lens.append(md.seq_lens[i])
        for i in short:
            n, ctx = loc[i + 1] - loc[i], md.context_lens[i]
            token_idx.extend(range(loc[i], loc[i] + n))
            req_idx.extend([i] * n)
            seq_lens.extend(range(ctx + 1, ctx + n + 1))
        if token_idx:
            rows = torch.tensor(token_idx, device=q.device)
            tables = md.block_tables[torch.tensor(req_idx, device=q.device)].contiguous()
            lens = torch.tensor(seq_lens, dtype=md.seq_lens_tensor.dtype, device=q.device)
            result = torch.empty((len(token_idx), *q.shape[1:]), dtype=q.dtype, device=q.device)
            decode_attention(result, q[rows].contiguous(), k_cache, v_cache, tables, lens, scale, sliding_window,
                             logit_softcap, kv_quant)
            out[rows] = result
        return rest


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
