"""The Attention module models use: binds a layer to its KV cache and the step's backend."""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend
from pagellm.attention.kv_quant import KVQuant
from pagellm.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        # Bound by the model runner once the cache is allocated.
        self.kv_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None
        self.kv_quant: KVQuant | None = None  # a quantized cache's state (scales), bound with the cache
        # fp8 KV cache scales (stored = value / scale); a checkpoint may provide them.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq*D] or [T, Hq, D], k/v: [T, Hkv*D] or [T, Hkv, D] -> [T, Hq*D]."""
        if self.kv_cache is None or self.backend is None:
            raise RuntimeError("Attention layer has no KV cache bound; the model runner binds it at start-up")
        md = get_forward_context().attn_metadata
        t = q.shape[0]
        # Views only where needed: each is a dispatch (~0.8 us), 30-60 of them a decode step.
        if q.dim() == 2:
            q = q.view(t, self.num_heads, self.head_dim)
        if k.dim() == 2:
            k = k.view(t, self.num_kv_heads, self.head_dim)
        if v.dim() == 2:
            v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.kv_cache, md, self.scale, self.sliding_window, self.logit_softcap,
                                   kv_quant=self.kv_quant)
        return out.reshape(t, self.num_heads * self.head_dim)
