"""Triton kernel: one paged attention over a flat batch that mixes prompt chunks and decodes.

Request i owns query tokens `query_start_loc[i]:query_start_loc[i+1]`; its K/V (the cached
context followed by this step's tokens, already written to the pool) are read through its
block table. Query token j of request i sits at position `context_len + j`, with
`context_len = seq_len - query_len`, and sees keys `0 .. position` (only the last
`sliding_window` of them when a window is set).

One program handles a tile of BLOCK_Q query tokens of one request times the GROUP query heads
that share one KV head (GQA), so each K/V tile is loaded once for the whole group; it walks the
request's KV blocks with an online softmax (in base 2). Tiles are numbered without a host-side
table: request i's first tile is `query_start_loc[i] // BLOCK_Q + i`, and a program finds its
request by binary search, so the grid depends only on the token and request counts (which
keeps the launch CUDA-graph safe).

Split-KV (flash-decoding): with few programs and long contexts, each program's KV range is cut
into NUM_SPLITS pieces run by separate programs, which write unnormalised partial results
(acc, running max, running sum); a second kernel merges them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
# Finite stand-in for -inf as the running max, so rows that see no key in a tile (sliding
# window, split ranges, padding) never compute exp2(-inf - -inf).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q: tl.constexpr):
    """The request whose tiles include `tile` (request i's first tile: qsl[i] // BLOCK_Q + i)."""
    # Loop-carried values start as int32 tensors (a Python 0 would change type inside the loop).
    lo = tile * 0
    hi = lo + num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    # tanh from exp: saturates cleanly to +-1 (exp overflowing to inf gives 1 - 0).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attend_kv_block(
    q, q_pos, m_i, l_i, acc, block, table_row, k_cache_ptr, v_cache_ptr, scale, softcap, sliding_window,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, kv_head, dims, dim_valid,
    model_ptr, k_scales_ptr, v_scales_ptr, k_scale, v_scale, num_kv_heads,
    BLOCK_SIZE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr, KV_QUANT: tl.constexpr,
):
    """One online-softmax step over logical KV block `block` of the request."""
    offs_n = tl.arange(0, BLOCK_SIZE)
    physical = tl.load(table_row + block).to(tl.int64)
    k = tl.load(k_cache_ptr + physical * stride_kb + offs_n[:, None] * stride_ks + kv_head * stride_kh
                + dims[None, :], mask=dim_valid[None, :], other=0.0)
    v = tl.load(v_cache_ptr + physical * stride_vb + offs_n[:, None] * stride_vs + kv_head * stride_vh
                + dims[None, :], mask=dim_valid[None, :], other=0.0)
    if KV_QUANT == 1:  # fp8: one scale per layer for K and for V; dequantized to the model dtype
        k = (k.to(tl.float32) * k_scale).to(model_ptr.dtype.element_ty)
        v = (v.to(tl.float32) * v_scale).to(model_ptr.dtype.element_ty)
    elif KV_QUANT == 2:  # int8: one scale per token and KV head, [blocks, block_size, kv_heads]
        scale_idx = (physical * BLOCK_SIZE + offs_n) * num_kv_heads + kv_head
        k = (k.to(tl.float32) * tl.load(k_scales_ptr + scale_idx)[:, None]).to(model_ptr.dtype.element_ty)
        v = (v.to(tl.float32) * tl.load(v_scales_ptr + scale_idx)[:, None]).to(model_ptr.dtype.element_ty)
    if INTERPRETER:
        # The interpreter has no 16-bit dot; fp32 operands give the same products (a bf16 x bf16
        # product is exact in fp32) with fp32 accumulation, as the tensor cores do.
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = s * _LOG2E  # natural -> base-2 exponent
    k_pos = block * BLOCK_SIZE + offs_n
    allowed = k_pos[None, :] <= q_pos[:, None]
    if USE_WINDOW:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the cache dtype (a quantized cache's: the model dtype) before P @ V, on the
    # GPU and in the interpreter alike.
    if KV_QUANT == 0:
        p = p.to(v_cache_ptr.dtype.element_ty)
    else:
        p = p.to(model_ptr.dtype.element_ty)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    k_scales_ptr, v_scales_ptr, k_scale, v_scale,
    num_reqs, scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, KV_QUANT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    req = _find_request(query_start_loc_ptr, tile, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    local_tile = tile - (q_start // BLOCK_Q + req)
    if local_tile * BLOCK_Q >= q_len:
        return  # the grid is an upper bound on the tile count
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    # Row r of the tile: query token local_tile * BLOCK_Q + r // GROUP_PAD, head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_M)
    q_idx = local_tile * BLOCK_Q + rows // GROUP_PAD
    group_head = rows % GROUP_PAD
    q_head = kv_head * GROUP + group_head
    row_valid = (q_idx < q_len) & (group_head < GROUP)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + q_token[:, None] * stride_qt + q_head[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if INTERPRETER:
        q = q.to(tl.float32)
    q_pos = context_len + q_idx

    # Keys this tile needs: up to its last query position; from its first position's window start.
    kv_end = context_len + tl.minimum((local_tile + 1) * BLOCK_Q, q_len)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_len + local_tile * BLOCK_Q - sliding_window + 1, 0)
    first_block = kv_begin // BLOCK_SIZE
    end_block = tl.cdiv(kv_end, BLOCK_SIZE)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(end_block - first_block, NUM_SPLITS)
        first_block = first_block + split * per_split
        end_block = tl.minimum(first_block + per_split, end_block)

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + req.to(tl.int64) * stride_bt
    if INTERPRETER:
        block = first_block
        while block < end_block:
            m_i, l_i, acc = _attend_kv_block(
                q, q_pos, m_i, l_i, acc, block, table_row, k_cache_ptr, v_cache_ptr, scale, softcap, sliding_window,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, kv_head, dims, dim_valid,
                q_ptr, k_scales_ptr, v_scales_ptr, k_scale, v_scale, tl.num_programs(1),
                BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRETER, KV_QUANT)
            block += 1
    else:
        for block in range(first_block, end_block):
            m_i, l_i, acc = _attend_kv_block(
                q, q_pos, m_i, l_i, acc, block, table_row, k_cache_ptr, v_cache_ptr, scale, softcap, sliding_window,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, kv_head, dims, dim_valid,
                q_ptr, k_scales_ptr, v_scales_ptr, k_scale, v_scale, tl.num_programs(1),
                BLOCK_SIZE, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, INTERPRETER, KV_QUANT)

    store_mask = row_valid[:, None] & dim_valid[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_token[:, None] * stride_ot + q_head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials: [T, Hq, NUM_SPLITS] for max/sum, [T, Hq, NUM_SPLITS, HEAD_DIM_PAD] for acc (contiguous).
        row_base = (q_token * (tl.num_programs(1) * GROUP) + q_head) * NUM_SPLITS + split
        tl.store(part_max_ptr + row_base, m_i, mask=row_valid)
        tl.store(part_sum_ptr + row_base, l_i, mask=row_valid)
        tl.store(part_acc_ptr + row_base[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=store_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * tl.num_programs(1) + head
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(part_max_ptr + row * NUM_SPLITS + splits)
    l = tl.load(part_sum_ptr + row * NUM_SPLITS + splits)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM_PAD + dims[None, :])
    weight = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def _interpreting() -> bool:
    # Two gaps in Triton 3.6's interpreter (CPU) that the kernel works around, running the same
    # _attend_kv_block body either way: range() over tensor bounds fails under numpy 2 (so the
    # interpreter walks the KV blocks with a while loop; compiled kernels keep the for loop, which
    # the compiler software-pipelines), and 16-bit tl.dot gives garbage (so operands go to fp32).
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _quant_args(kv_quant, k_cache: torch.Tensor, q: torch.Tensor):
    """(KV_QUANT mode 0/1/2, K scales, V scales, k_scale, v_scale) for the kernel; unused pointers are q."""
    if kv_quant is None:
        return 0, q, q, 1.0, 1.0
    if kv_quant.kind == "fp8":
        return 1, q, q, float(kv_quant.k_scale), float(kv_quant.v_scale)
    scales = kv_quant.scales
    if scales.shape != (2, *k_cache.shape[:3]) or not scales.is_contiguous():
        raise ValueError("int8 KV scales must be a contiguous [2, num_blocks, block_size, num_kv_heads] tensor")
    return 2, scales[0], scales[1], 1.0, 1.0


def choose_num_splits(num_tiles: int, num_kv_heads: int, max_seq_len: int, max_query_len: int, block_size: int,
                      num_sms: int, max_splits: int = 16) -> int:
    """Split-KV only for decode-only batches that leave the GPU under-occupied with long contexts.

    Aims at about two programs per SM and at least four KV blocks per split.
    """
    if max_query_len != 1:
        return 1
    programs = max(num_tiles * num_kv_heads, 1)
    wanted = -(-2 * num_sms // programs)
    by_length = max_seq_len // (4 * block_size)
    splits = min(max_splits, wanted, by_length)
    if splits < 2:
        return 1
    return min(triton.next_power_of_2(splits), max_splits)  # the merge kernel wants a power of two


def tile_shape(group: int, max_query_len: int, head_dim: int = 128) -> tuple[int, int]:
    """(BLOCK_M rows = BLOCK_Q tokens x GROUP_PAD heads, BLOCK_Q); tl.dot wants at least 16 rows.

    Decodes fill only GROUP rows of a tile, so decode-only batches take the smallest tile; prompt
    chunks take larger ones (smaller for head size 256, whose accumulator is twice as wide).
    """
    group_pad = triton.next_power_of_2(group)
    block_m = (64 if head_dim <= 128 else 32) if max_query_len * group_pad >= 64 else 16
    block_m = max(block_m, group_pad)
    return block_m, block_m // group_pad


def unified_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, max_seq_len: int, scale: float,
    sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
    num_splits: Optional[int] = None, num_sms: int = 132, kv_quant=None,
) -> torch.Tensor:
    """q/out: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; query_start_loc: [B+1] int32;
    seq_lens: [B] int32; block_tables: [B, max_blocks] int32. `max_query_len` / `max_seq_len` are
    host-side upper bounds (they pick tile shapes and the split count, never the result).
    `kv_quant` (`kv_quant.KVQuant`): the caches are fp8 / int8, dequantized as each tile is loaded."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0:
        return out
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("unified_attention needs the head dimension contiguous")
    if block_size < 16:
        raise ValueError(f"the Triton attention kernel needs block_size >= 16, got {block_size}")
    group = num_heads // num_kv_heads
    block_m, block_q = tile_shape(group, max_query_len, head_dim)
    num_tiles = num_tokens // block_q + num_reqs
    if num_splits is None:
        num_splits = choose_num_splits(num_tiles, num_kv_heads, max_seq_len, max_query_len, block_size, num_sms)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    head_dim_pad = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_max = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused by the single-pass kernel
    interpreter = _interpreting()
    quant_mode, k_scales, v_scales, k_scale, v_scale = _quant_args(kv_quant, k_cache, q)
    # fp32 inputs get true fp32 dots (tf32 would miss the 1e-3 tolerance); 16-bit ones use tensor cores.
    precision = "ieee" if q.dtype == torch.float32 or interpreter else "tf32"
    _unified_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start_loc,
        k_scales, v_scales, k_scale, v_scale,
        num_reqs, scale, float(logit_softcap or 0.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_SIZE=block_size,
        USE_SOFTCAP=logit_softcap is not None, USE_WINDOW=sliding_window is not None, NUM_SPLITS=num_splits,
        DOT_PRECISION=precision, INTERPRETER=interpreter, KV_QUANT=quant_mode,
        num_warps=4 if head_dim_pad <= 128 else 8,
        # fp32 tiles of head size 256 are too big to double-buffer in shared memory.
        num_stages=1 if q.element_size() == 4 and head_dim_pad >= 256 else 2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits, num_warps=4,
        )
    return out
