"""Triton GEMMs for weight-quantized linears on CUDA: W4A16 / W8A16 group GEMM and FP8 linear.

`group_matmul(x, qweight, scales, zeros, group_size, bits)`: out = x @ W^T with
W[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G], computed in fp32. Layouts:

- bits=4: qweight uint8 (N, K/2); byte j of row n holds input k = 2j in the low nibble and
  k = 2j + 1 in the high nibble. bits=8: qweight uint8 (N, K), unsigned codes.
- scales (N, ceil(K/G)) float16/bfloat16/float32; group_size -1 means one group (G = K); a G
  that does not divide K leaves a narrower last group.
- zeros None (symmetric: 8 for 4-bit, 128 for 8-bit), or (N, ceil(K/G)) uint8 codes or
  floats (GGUF Q4_1's min as -m/d, see `gguf_repack`). Act-order permutations are the caller's
  (pass x[:, perm]).

Each program dequantizes its (BLOCK_N, BLOCK_K) weight tile in registers to x's dtype and feeds
tl.dot with an fp32 accumulator; with one group per row the scale is applied once, to the
accumulator. The fp8 fallback of `fp8_linear` is the same kernel with a third weight decoder
(e4m3 bytes decoded with integer ops, so it needs no fp8 support from the GPU).

The W8A8 kernels live in `triton_int8_matmul` and the GGUF repacks in `gguf_repack`; both are
re-exported here.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from pagellm.ops.gguf_repack import repack_gguf, repack_gguf_q4_0, repack_gguf_q4_1, repack_gguf_q8_0
from pagellm.ops.quant_reference import FP8_E4M3_MAX, SYMMETRIC_ZERO, check_group_args
from pagellm.ops.triton_int8_matmul import int8_matmul, quantize_per_token_int8
from pagellm.ops.triton_matmul_common import (
    MatmulTiles, check_device, choose_tiles, grid_for, interpreting, k_tiles_per_split, num_sms, swizzled_tile,
)

__all__ = ["group_matmul", "fp8_linear", "fp8_scaled_mm_linear", "fp8_weight_only_matmul", "int8_matmul",
           "quantize_per_token_int8", "repack_gguf", "repack_gguf_q4_0", "repack_gguf_q4_1", "repack_gguf_q8_0", "MatmulTiles",
           "scaled_mm_support"]

_INT4, _UINT8, _FP8 = 0, 1, 2  # weight decoders
_ZERO_CONST, _ZERO_CODES, _ZERO_FLOAT = 0, 1, 2


@triton.jit
def _fp8_e4m3_to_fp32(code):
    """e4m3fn bytes -> fp32 by assembling fp32 bits (bias 7 -> 127); 0x7f / 0xff are NaN, no infinities."""
    c = code.to(tl.uint32)
    exponent = (c >> 3) & 0xF
    mantissa = c & 0x7
    normal = (((c >> 7) << 31) | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # mantissa * 2^-9
    subnormal = tl.where((c >> 7) != 0, -subnormal, subnormal)
    value = tl.where(exponent == 0, subnormal, normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _group_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_zn, stride_os, stride_om, stride_on,
    K: tl.constexpr, GROUP: tl.constexpr, WEIGHT: tl.constexpr, ZERO_MODE: tl.constexpr, SYM_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, K_TILES: tl.constexpr, PER_CHANNEL: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid_m, pid_n = swizzled_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)  # M x K and M x N offsets can pass 2^31 at long prefills; weights stay int32
    # PER_CHANNEL (one group per row): the scale is applied once, to the accumulator.
    # TILE_IN_GROUP (each K step inside one group): one scale / zero load per column, not per weight.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * (K_TILES * BLOCK_K)
    for t in range(0, K_TILES):
        k0 = k_begin + t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT == 0:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
                             mask=n_ok[:, None] & (offs_b[None, :] < K // 2), other=0)
            w = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # low nibble = even k
        else:
            codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0)
            if WEIGHT == 2:
                w = _fp8_e4m3_to_fp32(codes)
            else:
                w = codes.to(tl.float32)
        if TILE_IN_GROUP:
            g_offs = offs_n * stride_sn + k0 // GROUP
            g_mask = n_ok & (k0 < K)  # the last split may run past K: its group index would be out of bounds
        else:
            g_offs = offs_n[:, None] * stride_sn + offs_k[None, :] // GROUP
            g_mask = n_ok[:, None] & k_ok[None, :]
        if ZERO_MODE == 0:
            if WEIGHT != 2:
                w = w - SYM_ZERO
        else:
            if TILE_IN_GROUP:
                zero = tl.load(z_ptr + offs_n * stride_zn + k0 // GROUP, mask=g_mask, other=0).to(tl.float32)
                w = w - zero[:, None]
            else:
                zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + offs_k[None, :] // GROUP, mask=g_mask,
                               other=0).to(tl.float32)
                w = w - zero
        if not PER_CHANNEL:
            scale = tl.load(s_ptr + g_offs, mask=g_mask, other=0.0).to(tl.float32)
            if TILE_IN_GROUP:
                w = w * scale[:, None]
            else:
                w = w * scale
        w = w.to(x_ptr.dtype.element_ty)
        if INTERPRETER:
            # The interpreter's 16-bit tl.dot is wrong; fp32 operands (already rounded to x's dtype)
            # give the tensor cores' products with fp32 accumulation.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def group_kernel_constants(k: int, group: int, weight_kind: int, zero_mode: int, sym_zero: int, has_bias: bool,
                           x_dtype: torch.dtype, tiles: MatmulTiles, interpreter: bool) -> dict:
    """The constexpr arguments of one `_group_matmul_kernel` launch (the tests compile these offline)."""
    return dict(
        K=k, GROUP=group, WEIGHT=weight_kind, ZERO_MODE=zero_mode, SYM_ZERO=sym_zero, HAS_BIAS=has_bias,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        K_TILES=k_tiles_per_split(k, tiles),
        PER_CHANNEL=group == k, TILE_IN_GROUP=group == k or group % tiles.block_k == 0,
        # fp32 activations get true fp32 products (tf32 would not match an fp32 reference).
        DOT_PRECISION="ieee" if x_dtype == torch.float32 or interpreter else "tf32", INTERPRETER=interpreter,
    )


def _launch(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
            group: int, weight_kind: int, sym_zero: int, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
            tiles: Optional[MatmulTiles]) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0:
        return out
    if tiles is None:
        tiles = choose_tiles(m, n, k, group, num_sms(x2.device), fp32_inputs=x2.dtype == torch.float32)
    split = tiles.split_k
    # Split-K programs write fp32 partials, summed afterwards (no atomics: the result is deterministic).
    target = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else out
    zero_mode = _ZERO_CONST if zeros is None else (_ZERO_CODES if zeros.dtype == torch.uint8 else _ZERO_FLOAT)
    zeros_arg = scales if zeros is None else zeros
    fuse_bias = bias is not None and split == 1
    constants = group_kernel_constants(k, group, weight_kind, zero_mode, sym_zero, fuse_bias, x2.dtype, tiles,
                                       interpreting())
    _group_matmul_kernel[grid_for(m, n, tiles)](
        x2, qweight, scales, zeros_arg, bias if fuse_bias else scales, target,
        m, n,
        x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), zeros_arg.stride(0),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        **constants,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split > 1:
        summed = target.sum(dim=0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    return x.reshape(-1, x.shape[-1])


def group_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, bits: int, *, tiles: Optional[MatmulTiles] = None) -> torch.Tensor:
    """x (..., K) @ the group-quantized (N, K) weight -> (..., N) in x.dtype (layouts: module docstring).

    `tiles` overrides the shape heuristic (tests use it to force ragged tiles and split-K).
    """
    n, k, g = check_group_args(x, qweight, scales, zeros, group_size, bits)
    check_device("group_matmul", x, qweight, scales, *([] if zeros is None else [zeros]))
    x2 = _rows(x, "group_matmul")
    # The kernel walks rows by their stride and groups / bytes with stride 1 (a transposed GPTQ-style
    # (K/G, N) scale view would otherwise be read wrong); contiguous() is free when already so.
    zeros = None if zeros is None else zeros.contiguous()
    out = _launch(x2, qweight.contiguous(), scales.contiguous(), zeros, g, _INT4 if bits == 4 else _UINT8,
                  SYMMETRIC_ZERO[bits], None, x.dtype, tiles)
    return out.reshape(*x.shape[:-1], n)


def _check_fp8(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float]) -> tuple[torch.Tensor, bool]:
    """(w_scale as an fp32 (N, 1) column, whether it is per channel), after checking the shapes.

    A Python float scale is copied to the device on every call: pass a tensor under CUDA graphs.
    """
    if w_fp8.dtype != torch.float8_e4m3fn or w_fp8.dim() != 2:
        raise ValueError(f"fp8_linear: w_fp8 must be a 2-D float8_e4m3fn tensor, got {tuple(w_fp8.shape)} "
                         f"{w_fp8.dtype}")
    n, k = w_fp8.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: x has K={x.shape[-1]}, the weight {tuple(w_fp8.shape)} wants {k}")
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=w_fp8.device)
    if scale.numel() not in (1, n):
        raise ValueError(f"fp8_linear: w_scale must be a scalar or hold {n} values, got {tuple(scale.shape)}")
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(n, 1).contiguous(), False
    return scale.reshape(n, 1).contiguous(), True


def fp8_weight_only_matmul(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float],
                           bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None, *,
                           tiles: Optional[MatmulTiles] = None) -> torch.Tensor:
    """The Triton fallback: x stays in its dtype, fp8 weight tiles are decoded to fp32 in the kernel."""
    scale, _ = _check_fp8(x, w_fp8, w_scale)
    check_device("fp8_linear", x, w_fp8)
    x2 = _rows(x, "fp8_linear")
    k = x2.shape[1]
    out = _launch(x2, w_fp8.contiguous().view(torch.uint8), scale, None, k, _FP8, 0, bias, out_dtype or x.dtype,
                  tiles)
    return out.reshape(*x.shape[:-1], w_fp8.shape[0])


@functools.cache
def scaled_mm_support(device_index: int) -> str:
    """'rowwise', 'tensorwise' or 'none': what torch._scaled_mm can do on this GPU with this torch build.

    Found by trying a 16 x 16 product once per device (the first call must not be inside CUDA-graph
    capture; the runner's warm-up step comes first).
    """
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(device_index) < (8, 9):
        return "none"
    dev = torch.device("cuda", device_index)
    a = torch.zeros(16, 16, device=dev).to(torch.float8_e4m3fn)
    b = torch.zeros(16, 16, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    try:
        _scaled_mm(a, b, scale_a=one.expand(16, 1).contiguous(), scale_b=one.expand(1, 16).contiguous(),
                   out_dtype=torch.bfloat16)
        return "rowwise"
    except (RuntimeError, TypeError):
        pass
    try:
        _scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return "tensorwise"
    except (RuntimeError, TypeError):
        return "none"


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    out = torch._scaled_mm(a, b, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # torch < 2.5 also returned the output's amax


def _fp8_quantize(x2: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: scale = amax / 448 per row (or over the tensor), codes rounded by the cast."""
    xf = x2.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
    scale = (amax / FP8_E4M3_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_scaled_mm_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float],
                         bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None, *,
                         per_token: bool = True) -> torch.Tensor:
    """torch._scaled_mm with activations quantized to fp8 on the fly (any device torch supports it on).

    per_token: rowwise scales (amax / 448 per row, the weight scale per column), which torch supports
    with bf16 output only. Otherwise one activation scale for the tensor; a per-channel weight scale
    is then applied to an fp32 result. K and N must be multiples of 16.
    """
    scale_col, per_channel = _check_fp8(x, w_fp8, w_scale)
    out_dtype = out_dtype or x.dtype
    n, k = w_fp8.shape
    if k % 16 or n % 16:
        raise ValueError(f"fp8_scaled_mm_linear: K ({k}) and N ({n}) must be multiples of 16 for torch._scaled_mm")
    if per_token and out_dtype != torch.bfloat16:
        raise ValueError(f"fp8_scaled_mm_linear: per-token scales need bfloat16 output, got {out_dtype}")
    x2 = _rows(x, "fp8_linear")
    w_t = w_fp8.contiguous().t()  # column-major (K, N), as _scaled_mm wants its second operand
    x_q, x_scale = _fp8_quantize(x2, per_token)
    if per_token:
        out = _scaled_mm(x_q, w_t, scale_a=x_scale, scale_b=scale_col.t().contiguous(), out_dtype=torch.bfloat16)
        if bias is not None:
            out = out + bias.to(out.dtype)
    else:
        w_s = torch.ones((), device=x.device) if per_channel else scale_col[0, 0]
        out = _scaled_mm(x_q, w_t, scale_a=x_scale, scale_b=w_s,
                         out_dtype=torch.float32 if per_channel or bias is not None else out_dtype)
        if per_channel:
            out = out * scale_col.t()
        if bias is not None:
            out = out + bias.float()
        out = out.to(out_dtype)
    return out.reshape(*x.shape[:-1], n)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: Union[torch.Tensor, float],
               bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x (..., K) @ (w_fp8 * w_scale)^T (+ bias) -> (..., N) in out_dtype (default x.dtype).

    On GPUs with fp8 tensor cores (sm89+), `fp8_scaled_mm_linear`: per-token activation scales
    where the build has rowwise scaling and the output is bf16, per-tensor ones otherwise.
    Elsewhere (sm80, no _scaled_mm), and for K or N not a multiple of 16, the Triton weight-only
    kernel (`fp8_weight_only_matmul`). CUDA tensors only (CPU ones under the interpreter).
    """
    _check_fp8(x, w_fp8, w_scale)
    out_dtype = out_dtype or x.dtype
    n, k = w_fp8.shape
    mode = "none"
    if x.is_cuda and not interpreting() and k % 16 == 0 and n % 16 == 0:
        mode = scaled_mm_support(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if mode == "none":
        return fp8_weight_only_matmul(x, w_fp8, w_scale, bias, out_dtype)
    return fp8_scaled_mm_linear(x, w_fp8, w_scale, bias, out_dtype,
                                per_token=mode == "rowwise" and out_dtype == torch.bfloat16)
