"""Torch references for the quantized matmuls of `triton_quant_matmul` (and their shared argument checks).

Every reference dequantizes to fp32 and multiplies in fp32 (float64 for integer products, which
are then exact); the Triton kernels are tested against these.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from pagellm.ops.gguf_repack import unpack_int4

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
SYMMETRIC_ZERO = {4: 8, 8: 128}


def check_group_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                     group_size: int, bits: int) -> tuple[int, int, int]:
    """(N, K, G) of a group GEMM, or a ValueError naming the argument that does not fit."""
    if bits not in SYMMETRIC_ZERO:
        raise ValueError(f"group_matmul: bits must be 4 or 8, got {bits}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"group_matmul: qweight must be a 2-D uint8 tensor, got {tuple(qweight.shape)} "
                         f"{qweight.dtype}")
    k = x.shape[-1]
    n, row = qweight.shape
    if row * (8 // bits) != k:
        raise ValueError(f"group_matmul: x has K={k} but qweight {tuple(qweight.shape)} holds "
                         f"{row * (8 // bits)} {bits}-bit values per row")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_matmul: group_size must be -1 (one group per row) or positive, got {group_size}")
    g = k if group_size == -1 else min(group_size, k)
    groups = -(-k // g)  # a G that does not divide K leaves a narrower last group (as GPTQ stores them)
    if scales.shape != (n, groups) or not scales.is_floating_point():
        raise ValueError(f"group_matmul: scales must be float ({n}, {groups}), got {tuple(scales.shape)} "
                         f"{scales.dtype}")
    if zeros is not None:
        if zeros.shape != (n, groups):
            raise ValueError(f"group_matmul: zeros must be ({n}, {groups}), got {tuple(zeros.shape)}")
        if zeros.dtype != torch.uint8 and not zeros.is_floating_point():
            raise ValueError(f"group_matmul: zeros must be uint8 codes or floats, got {zeros.dtype}")
    return n, k, g


def dequantize_group(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                     bits: int) -> torch.Tensor:
    """The (N, K) fp32 weight: (code - zero) * scale, zero and scale shared by each group of G inputs
    (the last group narrower when G does not divide K)."""
    codes = unpack_int4(qweight) if bits == 4 else qweight
    k = codes.shape[1]
    g = k if group_size == -1 else min(group_size, k)
    zero = (torch.full_like(scales, SYMMETRIC_ZERO[bits], dtype=torch.float32) if zeros is None else zeros.float())
    return (codes.float() - zero.repeat_interleave(g, dim=1)[:, :k]) * scales.float().repeat_interleave(g, dim=1)[:, :k]


def group_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: Optional[torch.Tensor], group_size: int, bits: int) -> torch.Tensor:
    weight = dequantize_group(qweight, scales, zeros, group_size, bits)
    return (x.float() @ weight.t()).to(x.dtype)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch.round is round-half-to-even, as the kernel's rounding (and CUDA's cvt.rni) is."""
    return torch.round(x)


def quantize_per_token_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: scale = amax / 127 (1 for an all-zero row), code = round_half_even(x / scale) in [-127, 127]."""
    xf = x.float().reshape(-1, x.shape[-1])
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = round_half_even(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def _as_column(scale: Union[torch.Tensor, float], rows: int) -> torch.Tensor:
    """A scalar or (rows,) / (rows, 1) scale as an fp32 (rows, 1) column."""
    t = torch.as_tensor(scale, dtype=torch.float32)
    return t.reshape(-1, 1).expand(rows, 1) if t.numel() == 1 else t.reshape(rows, 1)


def int8_matmul_reference(x_q: torch.Tensor, x_scale: Union[torch.Tensor, float], w_q: torch.Tensor,
                          w_scale: Union[torch.Tensor, float], out_dtype: torch.dtype,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    acc = (x_q.double() @ w_q.double().t()).float()  # exact: |sum| < 2^53
    out = acc * _as_column(x_scale, x_q.shape[0]).to(acc.device) * _as_column(w_scale, w_q.shape[0]).to(acc.device).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_weight_only_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float],
                              bias: Optional[torch.Tensor] = None,
                              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The Triton fallback's math: x (kept in its dtype) times the fp8 weight decoded to fp32 and scaled per row."""
    weight = w_fp8.float() * _as_column(w_scale, w_fp8.shape[0]).to(x.device)
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def fp8_dynamic_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float],
                          bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                          per_token: bool = True) -> torch.Tensor:
    """The `_scaled_mm` path's math: activations quantized to fp8 (amax / 448 per token, or over the
    tensor), then fp32 products."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
    scale = (amax / FP8_E4M3_MAX).clamp(min=1e-12)
    x_fp8 = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return fp8_weight_only_reference(x_fp8.float() * scale, w_fp8, w_scale, bias, out_dtype or x.dtype)
