"""What the Triton quantized matmuls share: tile choice by shape, the program-id swizzle, device checks.

Tiles come from a heuristic on M rather than `triton.autotune`: autotuning times candidates on the
first call of every shape (slow start-up, and a timing run inside CUDA-graph capture would break
it), while the right tile for these weight-streaming GEMMs is mostly fixed by M.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DEFAULT_NUM_SMS = 132  # H100 / H200 SXM


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (Triton's CPU interpreter, read when triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, *tensors: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter (the tests)."""
    if interpreting():
        return
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(f"{name} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); got a "
                             f"tensor on {t.device}")


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class MatmulTiles:
    """One launch's tile shape. split_k > 1 cuts K across programs that write fp32 partial sums."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MatmulTiles.{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        if self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"MatmulTiles: split_k and group_m must be >= 1, got {self.split_k}, {self.group_m}")


def choose_tiles(m: int, n: int, k: int, group: int, sms: int = DEFAULT_NUM_SMS, block_k: int = 128,
                 fp32_inputs: bool = False) -> MatmulTiles:
    """Tiles by M for weight-streaming GEMMs on H100/H200.

    Decode-sized M (<= 16) is bound by reading the weight: a thin 16-row tile, wide K steps, and
    split-K when the N tiles alone leave SMs idle (Llama-8B's 4096-wide outputs make 64 tiles of 64
    columns for 132 SMs). Mid M takes 64-row tiles; prefill-sized M the 128 x 128 tensor-core tile
    with 8 warps and an L2-friendly grouped launch order. block_k stays within one quantization
    group when the group is a power of two, so each K step loads one scale per output column.
    fp32 activations (exact fp32 dots run on the FMA units, not tensor cores) take small tiles:
    larger ones spill registers (ptxas, sm_90a).
    """
    if fp32_inputs:
        bm, bn, bk, warps, stages = (16, 32, 32, 4, 2) if m <= 16 else (64, 64, 32, 8, 2)
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 64, block_k, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, min(block_k, 64), 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, min(block_k, 64), 8, 3
    if group < k and group >= 16 and group & (group - 1) == 0:
        bk = min(bk, group)
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, bk)
    split = 1
    # Split only while every piece keeps >= 4 K steps (else the partial sums cost more than they save).
    while programs * split < sms and split < 8 and k_tiles // (2 * split) >= 4:
        split *= 2
    return MatmulTiles(bm, bn, bk, split_k=split, num_warps=warps, num_stages=stages)


@triton.jit
def swizzled_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`, walking GROUP_M row tiles per column sweep so that
    consecutive programs share weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def round_half_even(v):
    """Round to nearest, ties to even (CUDA's cvt.rni, torch.round), from floor: exact for |v| < 2^22.

    libdevice's rint would do, but Triton's interpreter cannot run it.
    """
    lower = tl.floor(v)
    frac = v - lower
    odd = (lower - 2.0 * tl.floor(lower * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, lower + 1.0, lower)


def grid_for(m: int, n: int, tiles: MatmulTiles) -> tuple[int, int]:
    return (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n), tiles.split_k)


def k_tiles_per_split(k: int, tiles: MatmulTiles) -> int:
    return triton.cdiv(triton.cdiv(k, tiles.block_k), tiles.split_k)
