"""Triton kernel: write this step's new K/V into the paged block pool, one program per token.

The cache layout is the torch backend's: `[num_blocks, block_size, num_kv_heads, head_dim]`
for K and for V (the two halves of `kv_cache[2, ...]`). A negative slot means "padding" (a
CUDA-graph batch padded past its real requests) and writes nothing.
"""

from __future__ import annotations

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
