"""Rotary position embeddings (neox / rotate-half style) with a precomputed cos/sin table.

Inverse frequencies for scaled variants (llama3, linear, yarn, ...) come from transformers'
own rope functions so they match the reference model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.forward_context import current_forward_context


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_parameters(config) -> dict:
    """The config's rope settings as one dict, whichever transformers version wrote it."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0) -> None:
        super().__init__()
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * attention_scaling, persistent=False)
        # Partial rotary (e.g. Phi-4-mini): only the first `rotary_dim` dims of a head rotate.
        self.rotary_dim = 2 * inv_freq.numel()
        self.use_cpu_kernel = False  # set by enable_cpu_kernels(): one C++ call in place of ~20 torch ops

    def enable_cpu_kernel(self) -> None:
        self.use_cpu_kernel = True

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]; positions: [T]. The C++ kernel (float32 on the CPU)
        rotates q and k in place and returns them; the torch code returns new tensors."""
        if self.use_cpu_kernel and q.dtype is torch.float32 and k.dtype is torch.float32 and not q.is_cuda:
            torch.ops.pagellm_cpu.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos, sin = self._rows(positions, q.dtype)
        d = self.rotary_dim
        if d == q.shape[-1]:
            return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        return (torch.cat((self._rotate(q[..., :d], cos, sin), q[..., d:]), dim=-1),
                torch.cat((self._rotate(k[..., :d], cos, sin), k[..., d:]), dim=-1))

    def _rows(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin rows of `positions`, gathered once per step: every layer shares this table
        and the step's positions (30 gathers a step for SmolLM2 otherwise)."""
        ctx = current_forward_context()
        key = (id(self), dtype)
        if ctx is not None and key in ctx.step_cache:
            return ctx.step_cache[key]
        rows = (self.cos_cache[positions].to(dtype).unsqueeze(1), self.sin_cache[positions].to(dtype).unsqueeze(1))
        if ctx is not None:
            ctx.step_cache[key] = rows
        return rows

    @classmethod
    def _rotate(cls, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + cls._rotate_half(x) * sin


def get_rope(config, head_dim: int, max_position: int, params: dict | None = None) -> RotaryEmbedding:
    params = params or rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq, scaling = _default_inv_freq(params["rope_theta"], rotary_dim), 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
            raise ValueError(f"rope type {rope_type!r} is not supported")
        kwargs = {}
        if rope_type == "longrope":
            # HF switches between short and long factors by the current sequence length; a batch
            # engine cannot (sequences of both kinds share a step), so, like vLLM, the long factors
            # are used whenever the engine may run past the original context.
            kwargs["seq_len"] = max_position
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return RotaryEmbedding(inv_freq, max_position, scaling)
