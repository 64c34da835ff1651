"""Pure-torch paged attention: the CPU backend and the reference for GPU kernels.

New K/V are scattered into the block pool by slot first, then every request attends
over its cached context plus its own new tokens, read back through its block table.
Decodes (one query token) are batched into padded SDPA calls over groups of requests;
prompt chunks run one request at a time with an offset causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagellm.attention.backend import AttentionBackend, AttentionMetadata
from pagellm.attention.kv_quant import KVQuant, read_blocks, write_quantized


# Bytes of gathered K+V per decode group. Gathering the whole batch's context at once streams it
# through main memory twice (copy, then SDPA); groups this small stay in cache, 1.3-2.6x faster
# per layer on a 2-core CPU (batch 64 at 144 and 1104 tokens of context).
DEFAULT_DECODE_GROUP_BYTES = 6 << 20


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, decode_group_bytes: int = DEFAULT_DECODE_GROUP_BYTES) -> None:
        self.decode_group_bytes = decode_group_bytes

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None, logit_softcap: float | None = None,
                kv_quant: KVQuant | None = None) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        self._write_cache(k, v, k_cache, v_cache, metadata.slot_mapping, kv_quant)
        out = torch.empty_like(q)
        for i in self._attend_rows(q, k_cache, v_cache, metadata, scale, sliding_window, logit_softcap, out, kv_quant):
            start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
            seq_len, ctx = metadata.seq_lens[i], metadata.context_lens[i]
            keys, values = gather_kv(k_cache, v_cache, metadata.block_tables[i], seq_len, kv_quant, q.dtype)
            q_pos = torch.arange(ctx, seq_len, device=q.device)
            mask = causal_mask(q_pos, seq_len, sliding_window)
            out[start:end] = attend(q[start:end].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                    mask.unsqueeze(0), scale, logit_softcap).squeeze(0)
        return out

    @staticmethod
    def _write_cache(k, v, k_cache, v_cache, slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
        write_cache(k, v, k_cache, v_cache, slot_mapping, kv_quant)

    def _attend_rows(self, q, k_cache, v_cache, md: AttentionMetadata, scale, sliding_window, logit_softcap,
                     out, kv_quant: KVQuant | None = None) -> list[int]:
        """Attention for the requests a backend runs row by row (here: the decodes) into `out`; returns
        the requests left to the per-request prompt path."""
        if md.decode_indices:
            self._decode(q, k_cache, v_cache, md, scale, sliding_window, logit_softcap, out, kv_quant)
        return md.prefill_indices

    def _decode(self, q, k_cache, v_cache, md: AttentionMetadata, scale, sliding_window, logit_softcap,
                out, kv_quant: KVQuant | None = None) -> None:
        num_kv_heads, head_dim = k_cache.shape[2:]
        token_bytes = 2 * num_kv_heads * head_dim * q.element_size()  # gathered in the model dtype
        max_len = max(md.seq_lens[i] for i in md.decode_indices)
        group = max(1, self.decode_group_bytes // (token_bytes * max_len))
        for g in range(0, len(md.decode_indices), group):
            self._decode_group(q, k_cache, v_cache, md, md.decode_indices[g:g + group], scale, sliding_window,
                               logit_softcap, out, kv_quant)

    @staticmethod
    def _decode_group(q, k_cache, v_cache, md: AttentionMetadata, idx: list[int], scale, sliding_window,
                      logit_softcap, out, kv_quant: KVQuant | None = None) -> None:
        token_idx = torch.tensor([md.query_start_loc[i] for i in idx], device=q.device)
        seq_lens = md.seq_lens_tensor[idx].long()
        block_size = k_cache.shape[1]
        max_blocks = -(-max(md.seq_lens[i] for i in idx) // block_size)
        tables = md.block_tables[idx, :max_blocks].long()  # [Bd, nb]
        keys = read_blocks(k_cache, 0, tables, kv_quant, q.dtype).flatten(1, 2)  # [Bd, nb * bs, Hkv, D]
        values = read_blocks(v_cache, 1, tables, kv_quant, q.dtype).flatten(1, 2)
        key_pos = torch.arange(keys.shape[1], device=q.device)
        mask = key_pos[None, :] < seq_lens[:, None]  # [Bd, L]
        if sliding_window is not None:
            mask &= key_pos[None, :] > (seq_lens[:, None] - 1 - sliding_window)
        out[token_idx] = attend(q[token_idx].unsqueeze(1), keys, values, mask.unsqueeze(1), scale, logit_softcap).squeeze(1)


def write_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor, kv_quant: KVQuant | None = None) -> None:
    if slot_mapping.numel() == 0:
        return
    if kv_quant is not None:
        write_quantized(k, v, k_cache, v_cache, slot_mapping, kv_quant)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
              kv_quant: KVQuant | None = None, dtype: torch.dtype | None = None):
    """The first seq_len tokens of one request's K and V, in order: [seq_len, Hkv, D] (dequantized
    to `dtype` from a quantized cache)."""
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)].long()
    keys = read_blocks(k_cache, 0, blocks, kv_quant, dtype).flatten(0, 1)[:seq_len]
    values = read_blocks(v_cache, 1, blocks, kv_quant, dtype).flatten(0, 1)[:seq_len]
    return keys, values


def causal_mask(q_pos: torch.Tensor, seq_len: int, sliding_window: int | None) -> torch.Tensor:
    """[Tq, seq_len] bool: query at position p sees keys 0..p (and only the last `sliding_window` of them)."""
    key_pos = torch.arange(seq_len, device=q_pos.device)
    mask = key_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
           logit_softcap: float | None) -> torch.Tensor:
    """q: [B, Tq, Hq, D], keys/values: [B, L, Hkv, D], mask: [B, Tq, L] -> [B, Tq, Hq, D]. GQA by head groups."""
    q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
    if logit_softcap is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1), scale=scale,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        return out.transpose(1, 2)
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).transpose(1, 2)
