"""Triton LoRA shrink and expand for CUDA: each token against its own adapter slot (-1: none).

    shrink: h[t, :]            = x[t, :] @ A[slot[t]]^T            (fp32, [T, n * R])
    expand: out[t, off:off+N] += h[t, j*R:(j+1)*R] @ B_j[slot[t]]   (per output slice j)

One program per (token, tile of the output): the slot index is read per token, so a batch that
mixes adapters (and the base model) is one launch per shrink and one per slice, with no host-side
grouping. Decode batches (a few tokens per adapter) are what this shape suits; the weights of a
slot stay in L2 across the tokens that share it. Checked against the torch path through Triton's
interpreter (tests/test_triton_lora.py); not yet timed on a GPU. The layer sizes are constexprs
(as in the other Triton kernels here): one compile per layer shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagellm.ops.triton_matmul_common import check_device


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slot_ptr, h_ptr, K: tl.constexpr, NR: tl.constexpr, stride_x, stride_as, stride_ar, stride_h,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slot_ptr + t)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + t * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
                     mask=(r[:, None] < NR) & (k[None, :] < K) & valid, other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(h_ptr + t * stride_h + r, acc, mask=r < NR)


@triton.jit
def _lora_expand_kernel(h_ptr, b_ptr, slot_ptr, out_ptr, N: tl.constexpr, R: tl.constexpr, h_offset, out_offset, stride_h, stride_bs,
                        stride_br, stride_out, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slot_ptr + t)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        hv = tl.load(h_ptr + t * stride_h + h_offset + r, mask=r < R, other=0.0)
        bv = tl.load(b_ptr + slot * stride_bs + r[:, None] * stride_br + n[None, :],
                     mask=(r[:, None] < R) & (n[None, :] < N) & valid, other=0.0).to(tl.float32)
        acc += tl.sum(hv[:, None] * bv, axis=0)
    ptrs = out_ptr + t * stride_out + out_offset + n
    old = tl.load(ptrs, mask=n < N, other=0.0)
    tl.store(ptrs, (old.to(tl.float32) + acc).to(old.dtype), mask=n < N)


def add_lora_triton(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
                    slices: list[tuple[str, int, int]], token_slots: torch.Tensor,
                    block_k: int = 64, block_n: int = 64) -> torch.Tensor:
    """out += LoRA(x) in place: `a` [S, n*R, in], `bs[j]` [S, R, size_j] for the output slices
    `slices` [(name, offset, size)]; `token_slots` [T] (-1: no adapter)."""
    check_device("add_lora_triton", out, x, a, token_slots, *bs)
    if out.stride(-1) != 1:
        raise ValueError("add_lora_triton needs an output with contiguous columns")
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens, k = x.shape
    nr = a.shape[1]
    rank = nr // len(slices)
    a = a.contiguous()
    h = torch.empty(num_tokens, nr, dtype=torch.float32, device=x.device)
    block_r = max(16, triton.next_power_of_2(min(nr, 64)))
    _lora_shrink_kernel[(num_tokens, triton.cdiv(nr, block_r))](
        x, a, token_slots, h, k, nr, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k)
    expand_r = max(16, triton.next_power_of_2(min(rank, 64)))
    for j, (b, (_, offset, size)) in enumerate(zip(bs, slices)):
        b = b.contiguous()
        _lora_expand_kernel[(num_tokens, triton.cdiv(size, block_n))](
            h, b, token_slots, out, size, rank, j * rank, offset, h.stride(0), b.stride(0), b.stride(1),
            out.stride(0), BLOCK_N=block_n, BLOCK_R=expand_r)
    return out
