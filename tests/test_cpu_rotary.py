"""The C++ rotary embedding and KV cache write (`pagellm/ops/csrc/rotary_ops.cpp`) against the torch code.

- rotary_embedding vs RotaryEmbedding's torch expression, bit for bit: ragged token counts
  (1..37), GQA head counts, full and partial rotary (half widths that are and are not multiples
  of the 8/16-lane registers), positions up to the end of a long table, a scaled table; q and k
  given as the strided views a fused qkv projection splits into, rotated in place with nothing
  else touched. Every ISA path the CPU has, forced with PAGELLM_CPU_ISA.
- write_kv_cache vs index_copy_ (what torch_backend.write_cache does), bit for bit: float32,
  bfloat16 and float16 caches, float32 or same-dtype sources, strided sources.
- Bad arguments are ValueErrors naming what is wrong; the engine hooks take the kernels only
  where they apply.
"""

from __future__ import annotations

import pytest
import torch

from pagellm.attention.cpu_backend import CpuAttentionBackend
from pagellm.attention.torch_backend import write_cache
from pagellm.layers.rotary import RotaryEmbedding, _default_inv_freq
from pagellm.ops import cpu as cpu_ops
from pagellm.ops.cpu import enable_cpu_kernels, load_cpu_ops
from tests.conftest import isa_fixture


@pytest.fixture(autouse=True)
def cpu_ops_built():
    # A build failure must fail these tests, not quietly compare the torch fallback with itself.
    assert load_cpu_ops(), "the C++ CPU kernels failed to build (see the warning logged above)"


isa = isa_fixture(cpu_ops)


MAX_POSITION = 40000


def _rope(head_dim: int, rotary_dim: int, scaling: float = 1.0) -> RotaryEmbedding:
    return RotaryEmbedding(_default_inv_freq(10000.0, rotary_dim), MAX_POSITION, scaling)


def _fused_qkv(gen, t: int, hq: int, hkv: int, d: int):
    """A [T, (Hq + 2 Hkv) * D] projection output and its q/k/v views, as LlamaAttention splits it."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 3
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return qkv, q.view(t, hq, d), k.view(t, hkv, d), v


# (head_dim, rotary_dim): half widths 32 (whole registers), 48, 20 and 10 (SIMD remainders), 3 (all tail).
DIMS = [(64, 64), (128, 96), (40, 40), (64, 20), (8, 6)]


@pytest.mark.parametrize("d,rotary_dim", DIMS)
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
def test_rotary_matches_torch_bit_for_bit(isa, d, rotary_dim, hq, hkv):
    gen = torch.Generator().manual_seed(d * 100 + hq * 10 + hkv)
    rope = _rope(d, rotary_dim, scaling=1.0 if hq != 8 else 0.8)
    for t in (1, 2, 7, 16, 37):
        qkv, q, k, v = _fused_qkv(gen, t, hq, hkv, d)
        # Random positions, including the table's last row.
        positions = torch.randint(0, MAX_POSITION, (t,), generator=gen)
        positions[-1] = MAX_POSITION - 1
        want_q, want_k = rope(positions, q.clone(), k.clone())  # the torch expression (kernel off)
        v_before = v.clone()
        torch.ops.pagellm_cpu.rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
        assert torch.equal(q, want_q) and torch.equal(k, want_k), (isa, t)
        assert torch.equal(v, v_before)  # in place on q and k only
        assert torch.equal(qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d), want_k)


def test_rotary_module_switch_runs_the_kernel_in_place():
    gen = torch.Generator().manual_seed(1)
    rope = _rope(64, 64)
    _, q, k, _ = _fused_qkv(gen, 5, 9, 3, 64)
    positions = torch.arange(100, 105)
    want_q, want_k = rope(positions, q.clone(), k.clone())
    assert enable_cpu_kernels(torch.nn.ModuleList([rope])) == 1 and rope.use_cpu_kernel
    got_q, got_k = rope(positions, q, k)
    assert got_q is q and got_k is k
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    # Other dtypes stay on the torch code (a new tensor, the same values as the torch reference).
    qb, kb = q.to(torch.bfloat16), k.to(torch.bfloat16)
    rope.use_cpu_kernel = False
    ref_q, ref_k = rope(positions, qb, kb)
    rope.use_cpu_kernel = True
    got_q, got_k = rope(positions, qb, kb)
    assert got_q is not qb and torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


def test_rotary_rejects_bad_arguments():
    rope = _rope(64, 64)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    op = torch.ops.pagellm_cpu.rotary_embedding
    with pytest.raises(ValueError, match="position 40000 is outside"):
        op(torch.tensor([0, MAX_POSITION]), q, k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="position -1 is outside"):
        op(torch.tensor([-1, 0]), q, k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="positions must be a contiguous int64"):
        op(torch.tensor([0, 1], dtype=torch.int32), q, k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="q must be a float32"):
        op(torch.tensor([0, 1]), q.double(), k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="k has 3 tokens"):
        op(torch.tensor([0, 1]), q, torch.randn(3, 2, 64), rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        op(torch.tensor([0, 1]), q.transpose(1, 2)[:, :4], k, rope.cos_cache, rope.sin_cache)
    with pytest.raises(ValueError, match="rotary_dim 64 exceeds"):
        op(torch.tensor([0, 1]), torch.randn(2, 4, 32), k, rope.cos_cache, rope.sin_cache)


def _cache_and_slots(gen, t: int, hkv: int, d: int, dtype):
    blocks, block_size = 7, 16
    cache = torch.randn(2, blocks, block_size, hkv, d, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:t]
    return cache, slots


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same_dtype_source", [False, True])
def test_write_kv_cache_matches_index_copy(cache_dtype, same_dtype_source):
    gen = torch.Generator().manual_seed(2)
    for t in (1, 3, 16, 37):
        for hkv, d in ((3, 64), (1, 40), (4, 128)):
            _, _, k, v = _fused_qkv(gen, t, 2 * hkv, hkv, d)
            v = v.view(t, hkv, d)  # strided views of the fused projection
            if same_dtype_source:
                k, v = k.to(cache_dtype), v.to(cache_dtype)
            cache, slots = _cache_and_slots(gen, t, hkv, d, cache_dtype)
            want = cache.clone()
            write_cache(k, v, want[0], want[1], slots)
            torch.ops.pagellm_cpu.write_kv_cache(k, v, cache[0], cache[1], slots)
            assert torch.equal(cache, want), (t, hkv, d)


def test_cpu_backend_cache_write_uses_the_kernel_where_it_applies(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(4, 3, 64, generator=gen), torch.randn(4, 3, 64, generator=gen)
    calls = []
    real = torch.ops.pagellm_cpu.write_kv_cache
    monkeypatch.setattr(torch.ops.pagellm_cpu, "write_kv_cache", lambda *a: calls.append(1) or real(*a))
    for src_dtype, cache_dtype, kernel in ((torch.float32, torch.float32, True), (torch.float32, torch.bfloat16, True),
                                           (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float32, False)):
        calls.clear()
        cache, slots = _cache_and_slots(gen, 4, 3, 64, cache_dtype)
        want = cache.clone()
        write_cache(k.to(src_dtype), v.to(src_dtype), want[0], want[1], slots)
        CpuAttentionBackend._write_cache(k.to(src_dtype), v.to(src_dtype), cache[0], cache[1], slots)
        assert torch.equal(cache, want) and bool(calls) == kernel, (src_dtype, cache_dtype)


def test_write_kv_cache_rejects_bad_arguments():
    cache = torch.zeros(2, 4, 16, 3, 64)
    k = v = torch.randn(2, 3, 64)
    op = torch.ops.pagellm_cpu.write_kv_cache
    with pytest.raises(ValueError, match="slot 64 is outside the cache's 0..63"):
        op(k, v, cache[0], cache[1], torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="slot -1 is outside"):
        op(k, v, cache[0], cache[1], torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="slot_mapping must be a contiguous int64"):
        op(k, v, cache[0], cache[1], torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="k must be a CPU .tokens, kv_heads, head_dim. tensor"):
        op(torch.randn(2, 2, 64), v, cache[0], cache[1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="v must have the cache's dtype or float32"):
        op(k, v.double(), cache[0], cache[1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k_cache/v_cache must be contiguous"):
        op(k, v, cache[0], cache[1].to(torch.bfloat16), torch.tensor([0, 1]))


def test_write_kv_cache_fp8_matches_quantize_then_index_copy():
    """The fp8 cache's write: clamp(x / scale) in e4m3 at the slots, bit for bit kv_quant's torch
    code (large values saturate at 448, tiny ones round to zero or subnormals)."""
    from pagellm.attention.kv_quant import KVQuant

    gen = torch.Generator().manual_seed(4)
    for t in (1, 5, 37):
        for hkv, d in ((3, 64), (2, 40)):
            _, _, k, v = _fused_qkv(gen, t, 2 * hkv, hkv, d)
            v = v.view(t, hkv, d) * 300.0  # saturates some values at scale 0.5
            k = k * 1e-3
            cache, slots = _cache_and_slots(gen, t, hkv, d, torch.float32)
            cache = cache.to(torch.float8_e4m3fn)
            quant = KVQuant("fp8", k_scale=0.02, v_scale=0.5)
            want = cache.clone()
            write_cache(k, v, want[0], want[1], slots, quant)
            CpuAttentionBackend._write_cache(k, v, cache[0], cache[1], slots, quant)
            assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8)), (t, hkv, d)
    op = torch.ops.pagellm_cpu.write_kv_cache_fp8
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        op(k, v, cache[0].float(), cache[1].float(), slots, 1.0, 1.0)
    with pytest.raises(ValueError, match="scales must be positive"):
        op(k, v, cache[0], cache[1], slots, 0.0, 1.0)
    with pytest.raises(ValueError, match="float32"):
        op(k.bfloat16(), v.bfloat16(), cache[0], cache[1], slots, 1.0, 1.0)
