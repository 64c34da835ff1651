"""Triton W8A8: per-token int8 activation quantization and the int8 x int8 -> int32 GEMM.

`quantize_per_token_int8(x)`: per row, scale = amax / 127 (1 for an all-zero row) and
code = round-half-to-even(x / scale) clamped to [-127, 127], with an IEEE division, so the codes
equal torch's `torch.round(x.float() / scale)` bit for bit (`quant_reference`).

`int8_matmul(x_q, x_scale, w_q, w_scale, out_dtype, bias)`: out = (x_q @ w_q^T) (int32, exact)
* x_scale[m] * w_scale[n] (+ bias), the scaling in fp32.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from pagellm.ops.triton_matmul_common import (
    MatmulTiles, check_device, choose_tiles, grid_for, k_tiles_per_split, num_sms, round_half_even, swizzled_tile,
)

_INT8_MAX = tl.constexpr(127.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_xm, stride_qm, K: tl.constexpr, BLOCK: tl.constexpr,
                          N_TILES: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, N_TILES):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # div_rn: IEEE division (plain `/` on fp32 compiles to an approximate one), so codes match torch's.
    scale = tl.math.div_rn(amax, amax * 0.0 + _INT8_MAX)
    scale = tl.max(scale, 0)  # max(amax) / 127 == max(amax / 127): division by a constant is monotonic
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scale_ptr + row, scale)
    denominator = tl.zeros((BLOCK,), dtype=tl.float32) + scale
    for t in range(0, N_TILES):
        offs = t * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(x, denominator))
        q = tl.minimum(tl.maximum(q, -_INT8_MAX), _INT8_MAX)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + offs, q.to(tl.int8), mask=offs < K)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> (codes int8 (..., K), scales fp32 (..., 1)); rounding is half-to-even."""
    if not x.is_floating_point():
        raise ValueError(f"quantize_per_token_int8: x must be floating point, got {x.dtype}")
    check_device("quantize_per_token_int8", x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    if x2.shape[0] and k:
        block = min(triton.next_power_of_2(k), 2048)
        _quantize_rows_kernel[(x2.shape[0],)](x2, q, scale, x2.stride(0), q.stride(0), K=k, BLOCK=block,
                                              N_TILES=triton.cdiv(k, block), num_warps=4 if block <= 1024 else 8)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, stride_xm, stride_wn, stride_os, stride_om,
    K: tl.constexpr, X_PER_ROW: tl.constexpr, W_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    K_TILES: tl.constexpr,
):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)  # M x K and M x N offsets can pass 2^31 at long prefills; weights stay int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_begin = split * (K_TILES * BLOCK_K)
    for t in range(0, K_TILES):
        offs_k = k_begin + t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    if X_PER_ROW:
        x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        x_scale = tl.load(xs_ptr + offs_m * 0)
    if W_PER_ROW:
        w_scale = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    else:
        w_scale = tl.load(ws_ptr + offs_n * 0)
    out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_kernel_constants(k: int, x_per_row: bool, w_per_row: bool, has_bias: bool, tiles: MatmulTiles) -> dict:
    """The constexpr arguments of one `_int8_matmul_kernel` launch (the tests compile these offline)."""
    return dict(K=k, X_PER_ROW=x_per_row, W_PER_ROW=w_per_row, HAS_BIAS=has_bias, BLOCK_M=tiles.block_m,
                BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                K_TILES=k_tiles_per_split(k, tiles))


def _scale_vector(scale: Union[torch.Tensor, float], rows: int, name: str, device: torch.device) -> torch.Tensor:
    """A scalar, (rows,) or (rows, 1) scale as a contiguous fp32 vector (1 value when scalar)."""
    t = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() not in (1, rows):
        raise ValueError(f"int8_matmul: {name} must be a scalar or hold {rows} values, got {t.numel()}")
    return t.contiguous()


def int8_matmul(x_q: torch.Tensor, x_scale: Union[torch.Tensor, float], w_q: torch.Tensor,
                w_scale: Union[torch.Tensor, float], out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None,
                *, tiles: Optional[MatmulTiles] = None) -> torch.Tensor:
    """x_q int8 (M, K) @ w_q int8 (N, K)^T with int32 accumulation, scaled per row of each -> (M, N) out_dtype.

    A Python float scale is copied to the device on every call: pass tensors under CUDA graphs.
    """
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8 or x_q.dim() != 2 or w_q.dim() != 2:
        raise ValueError(f"int8_matmul: x_q and w_q must be 2-D int8, got {x_q.dtype} {tuple(x_q.shape)} and "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    m, k = x_q.shape
    n = w_q.shape[0]
    if w_q.shape[1] != k:
        raise ValueError(f"int8_matmul: x_q has K={k}, w_q {tuple(w_q.shape)} wants {w_q.shape[1]}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"int8_matmul: bias must be ({n},), got {tuple(bias.shape)}")
    check_device("int8_matmul", x_q, w_q)
    xs = _scale_vector(x_scale, m, "x_scale", x_q.device)
    ws = _scale_vector(w_scale, n, "w_scale", x_q.device)
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    x_q = x_q if x_q.stride(1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(1) == 1 else w_q.contiguous()
    if tiles is None:
        tiles = choose_tiles(m, n, k, k, num_sms(x_q.device), block_k=128)
    split = tiles.split_k
    # Split-K programs write scaled fp32 partials (scaling is linear), summed afterwards.
    target = torch.empty((split, m, n), dtype=torch.float32, device=x_q.device) if split > 1 else out
    fuse_bias = bias is not None and split == 1
    _int8_matmul_kernel[grid_for(m, n, tiles)](
        x_q, w_q, xs, ws, bias if fuse_bias else xs, target,
        m, n, x_q.stride(0), w_q.stride(0), target.stride(0) if split > 1 else 0, target.stride(-2),
        **int8_kernel_constants(k, xs.numel() > 1 or m == 1, ws.numel() > 1 or n == 1, fuse_bias, tiles),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split > 1:
        summed = target.sum(dim=0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out
