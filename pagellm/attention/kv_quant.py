"""Quantized KV cache: storage formats, the per-layer quantization state, torch quantize/dequantize.

`kv_cache_dtype`:
- auto: the cache holds the model dtype (no quantization).
- fp8 (= fp8_e4m3): float8_e4m3fn values, stored = value / scale with one scalar scale per layer
  for K and one for V (1.0 unless the checkpoint carries `k_scale` / `v_scale`), saturated to
  +-448 (e4m3fn has no infinity: an unsaturated overflow would become NaN).
- int8: symmetric int8 with one fp32 scale per token and KV head (amax / 127 of its head vector),
  kept in a tensor beside the blocks, [2, num_blocks, block_size, num_kv_heads].

Writes quantize; every backend dequantizes as it reads (to the model dtype, so attention math is
unchanged). The torch functions here are the reference the C++ and Triton kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.layers.utils import materialize

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
INT8_SCALE_DTYPE = torch.float32
# Scale of an all-zero head vector stays 0 (it dequantizes to zeros); the division uses this floor.
_MIN_SCALE = 1e-30


def kv_cache_kind(kv_cache_dtype: str) -> str:
    """'auto' | 'fp8' | 'int8' (fp8_e4m3 is fp8's long name); a ValueError naming the choices otherwise."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"EngineConfig.kv_cache_dtype: must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return "fp8" if kv_cache_dtype.startswith("fp8") else kv_cache_dtype


@dataclass(frozen=True)
class KVCacheFormat:
    """How one engine stores K/V: the kind and the model dtype the reads dequantize to."""

    kind: str  # "auto" | "fp8" | "int8"
    model_dtype: torch.dtype

    @classmethod
    def from_config(cls, kv_cache_dtype: str, model_dtype: torch.dtype) -> "KVCacheFormat":
        return cls(kv_cache_kind(kv_cache_dtype), model_dtype)

    @property
    def quantized(self) -> bool:
        return self.kind != "auto"

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"auto": self.model_dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[self.kind]

    def bytes_per_head_token(self, head_dim: int) -> int:
        """Bytes of one token's K (or V) for one KV head, scale included."""
        elem = torch.empty((), dtype=self.storage_dtype).element_size()
        scale = torch.empty((), dtype=INT8_SCALE_DTYPE).element_size() if self.kind == "int8" else 0
        return head_dim * elem + scale

    def label(self) -> str:
        return str(self.model_dtype).removeprefix("torch.") if self.kind == "auto" else self.kind


@dataclass
class KVQuant:
    """One layer's quantization state, handed to the backend with its cache."""

    kind: str  # "fp8" | "int8"
    k_scale: float = 1.0  # fp8: stored = value / scale
    v_scale: float = 1.0
    scales: Optional[torch.Tensor] = None  # int8: [2, num_blocks, block_size, num_kv_heads] fp32

    def scale(self, which: int) -> float:
        return self.k_scale if which == 0 else self.v_scale


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: what the Triton write kernel does too."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], fp32 scale [...]) with x ~ q * scale, scale = amax / 127."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / INT8_MAX
    q = round_half_away(x / scale.clamp_min(_MIN_SCALE).unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale.to(INT8_SCALE_DTYPE)


def write_quantized(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, quant: KVQuant) -> None:
    """Quantizes k/v [T, Hkv, D] into the caches [blocks, block_size, Hkv, D] at `slot_mapping`."""
    for which, x, cache in ((0, k, k_cache), (1, v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        if quant.kind == "fp8":
            # index_copy_ has no float8 kernel on the CPU; the bytes are the same.
            flat.view(torch.uint8).index_copy_(0, slot_mapping, quantize_fp8(x, quant.scale(which)).view(torch.uint8))
        else:
            data, scale = quantize_int8(x)
            flat.index_copy_(0, slot_mapping, data)
            quant.scales[which].view(-1, cache.shape[2]).index_copy_(0, slot_mapping, scale)


def read_blocks(cache: torch.Tensor, which: int, blocks: torch.Tensor, quant: Optional[KVQuant],
                dtype: torch.dtype) -> torch.Tensor:
    """cache[blocks] ([*blocks.shape, block_size, Hkv, D]) dequantized to `dtype`."""
    data = cache[blocks]
    if quant is None:
        return data
    if quant.kind == "fp8":
        return (data.float() * quant.scale(which)).to(dtype)
    return (data.float() * quant.scales[which][blocks].unsqueeze(-1)).to(dtype)


def load_kv_scale(modules: dict, name: str, tensor: torch.Tensor) -> bool:
    """Routes a checkpoint's `*.self_attn.{k,v}_scale` (or `*.self_attn.{k,v}_proj.{k,v}_scale`,
    `kv_scale`) to that layer's Attention module. True when `name` is such a scale, loaded or not:
    layers without one (another pipeline stage) drop it, and only an fp8 cache uses it."""
    module_path, _, leaf = name.rpartition(".")
    if leaf not in ("k_scale", "v_scale", "kv_scale"):
        return False
    if module_path.endswith((".k_proj", ".v_proj")):
        module_path = module_path.rpartition(".")[0]
    attn = modules.get(f"{module_path}.attn")
    if attn is None or not hasattr(attn, "k_scale"):
        return True
    value = float(materialize(tensor).float().reshape(-1).max())  # a per-tensor scale; the largest if it came per channel
    if leaf in ("k_scale", "kv_scale"):
        attn.k_scale = value
    if leaf in ("v_scale", "kv_scale"):
        attn.v_scale = value
    return True
