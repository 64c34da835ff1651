"""Triton kernel: write this step's new K/V into the paged block pool, one program per token.

The cache layout is the torch backend's: `[num_blocks, block_size, num_kv_heads, head_dim]`
for K and for V (the two halves of `kv_cache[2, ...]`). A negative slot means "padding" (a
CUDA-graph batch padded past its real requests) and writes nothing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    # All heads of the token at once: element i is head i // HEAD_DIM, dim i % HEAD_DIM.
    i = tl.arange(0, BLOCK)
    head = i // HEAD_DIM
    dim = i % HEAD_DIM
    valid = i < NUM_KV_HEADS * HEAD_DIM
    dst = block * stride_cb + offset * stride_cs + head * stride_ch + dim
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + dim, mask=valid)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=valid)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + dim, mask=valid)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=valid)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("reshape_and_cache needs the head dimension contiguous in k, v and the cache")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("K and V caches must share one layout")
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK=triton.next_power_of_2(num_kv_heads * head_dim), BLOCK_SIZE=k_cache.shape[1],
        num_warps=4,
    )



@triton.jit
def _round_to_e4m3(x):
    """x (|x| <= 448, float32) rounded to the nearest float8_e4m3fn value, ties to even, still float32.

    Triton 3.6's interpreter casts float32 -> fp8 wrongly when rounding carries into the exponent
    (0.4927 -> 0.25); the GPU's conversion is right. Rounding first makes the interpreter's cast exact.
    """
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 the spacing is the subnormals'
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    y = tl.abs(x) / step
    low = tl.floor(y)
    frac = y - low
    odd = low - 2.0 * tl.floor(low * 0.5)
    rounded = tl.where(frac > 0.5, low + 1.0, tl.where(frac < 0.5, low, low + odd))
    return tl.where(x < 0, -rounded, rounded) * step


@triton.jit
def _quantize_store(x, dst_ptr, scales_ptr, scale, heads, valid, NUM_KV_HEADS: tl.constexpr, INT8: tl.constexpr,
                    INTERPRETER: tl.constexpr):
    """x: [HEADS_PAD, DIM_PAD] float32, one token's heads. fp8: x / scale, saturated to +-448; int8:
    per head scale = amax / 127 (stored at scales_ptr + head), round(x / scale), ties away from zero."""
    if INT8:
        head_scale = tl.max(tl.abs(x), 1) / 127.0
        scaled = x / tl.maximum(head_scale, 1e-30)[:, None]
        rounded = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(0.5 - scaled))
        tl.store(dst_ptr, tl.clamp(rounded, -127.0, 127.0).to(tl.int8), mask=valid)
        tl.store(scales_ptr + heads, head_scale, mask=heads < NUM_KV_HEADS)
    else:
        scaled = tl.clamp(x / scale, -448.0, 448.0)
        if INTERPRETER:
            scaled = _round_to_e4m3(scaled)
        tl.store(dst_ptr, scaled.to(dst_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _reshape_and_cache_quant_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scales_ptr, v_scales_ptr, slot_mapping_ptr, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, INT8: tl.constexpr, INTERPRETER: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    valid = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    dst = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=valid, other=0.0)
    _quantize_store(k.to(tl.float32), k_cache_ptr + dst, k_scales_ptr + slot * NUM_KV_HEADS, k_scale, heads, valid,
                    NUM_KV_HEADS, INT8, INTERPRETER)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=valid, other=0.0)
    _quantize_store(v.to(tl.float32), v_cache_ptr + dst, v_scales_ptr + slot * NUM_KV_HEADS, v_scale, heads, valid,
                    NUM_KV_HEADS, INT8, INTERPRETER)


def reshape_and_cache_quantized(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor, kv_quant) -> None:
    """`reshape_and_cache` into an fp8 / int8 cache (`kv_quant`: a `kv_quant.KVQuant`), quantizing
    as `kv_quant.write_quantized` does; int8 scales go to kv_quant.scales [2, blocks, block_size, Hkv]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("reshape_and_cache needs the head dimension contiguous in k, v and the cache")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("K and V caches must share one layout")
    if kv_quant.kind == "fp8" and k_cache.is_cuda and torch.cuda.get_device_capability(k_cache.device) < (8, 9):
        raise ValueError("EngineConfig.kv_cache_dtype: 'fp8' with the Triton backend needs a GPU with fp8 "
                         "conversions (compute capability 8.9+); use kv_cache_dtype='int8'")
    int8 = kv_quant.kind == "int8"
    if int8:
        scales = kv_quant.scales
        if scales.shape != (2, *k_cache.shape[:3]) or not scales.is_contiguous():
            raise ValueError("int8 KV scales must be a contiguous [2, num_blocks, block_size, num_kv_heads] tensor")
        k_scales, v_scales = scales[0], scales[1]
    else:
        k_scales = v_scales = k  # unused
    _reshape_and_cache_quant_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, k_scales, v_scales, slot_mapping, float(kv_quant.k_scale), float(kv_quant.v_scale),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1], INT8=int8,
        INTERPRETER=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), num_warps=4,
    )
