"""Group-quantized integer weights (GPTQ, AWQ, compressed-tensors pack-quantized): the fixed layout,
its CPU kernels on every ISA path against dequantize-then-matmul, the weight method, and tiny random
Llama checkpoints written in each on-disk layout (by the packers below, from the formats' specs),
loaded quantized against the same checkpoint dequantized at load (--quantization none)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pagellm.layers.linear import Linear, MergedLinear
from pagellm.layers.quantization import int_group
from pagellm.layers.quantization.int_group import (GroupQuantizedLinearMethod, GroupQuantizedWeight, _cuda_linear,
                                                   fuse_group_weights, group_count, pack_codes, perm_from_g_idx)
from pagellm.ops import gguf_cpu
from pagellm.ops.int_group_cpu import CpuGroupWeight
from tests.group_quant_checkpoints import (AWQ_NIBBLE_COLUMNS, act_order_g_idx, pack_awq, pack_low_bits_first,
                                           write_quantized_llama)
from tests.test_quantized_weights import isa, kernels  # noqa: F401  (fixtures: every GGUF kernel path)

ISAS = list(gguf_cpu.ISA_NAMES)


def random_weight(n: int, k: int, bits: int, group_size: int, asym: bool, act_order: bool,
                  seed: int) -> tuple[GroupQuantizedWeight, torch.Tensor]:
    """A random weight in the fixed layout and its codes (N, K), every code and zero-point value in range."""
    gen = torch.Generator().manual_seed(seed)
    groups = group_count(k, k if group_size == -1 else group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).to(torch.uint8) if asym else None
    perm = torch.randperm(k, generator=gen) if act_order else None
    return GroupQuantizedWeight(bits, pack_codes(codes, bits), scales, zeros, group_size, k, perm), codes


def reference(weight: GroupQuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
    """float64 (N, K) in input order, straight from the definition value = (code - zero) * scale."""
    n, k = weight.shape
    g = weight.group_size
    group_of_stored = torch.arange(k) // g
    zeros = weight.zeros.double() if weight.zeros is not None else torch.full(weight.scales.shape, 1 << (weight.bits - 1),
                                                                              dtype=torch.float64)
    stored = (codes.double() - zeros[:, group_of_stored]) * weight.scales.double()[:, group_of_stored]
    if weight.perm is None:
        return stored
    out = torch.empty_like(stored)
    out[:, weight.perm] = stored
    return out


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, rel: float = 1e-5) -> None:
    """float32 accumulation in any order: within a few ulp of the float64 product's magnitude."""
    ref = x.double() @ w64.T
    bound = rel * (x.double().abs() @ w64.abs().T) + 1e-6
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


# ---------------------------------------------------------------------------------------------
# The fixed layout and the CPU kernels
# ---------------------------------------------------------------------------------------------

SHAPES = [(7, 96), (33, 576), (130, 160)]  # K=576 with G=128: a narrower last group


def check_cpu_kernel(bits: int, group_size: int, asym: bool, act_order: bool, tiles: bool = False) -> None:
    for i, (n, k) in enumerate(SHAPES):
        weight, codes = random_weight(n, k, bits, group_size, asym, act_order, seed=i + 10 * bits)
        w64 = reference(weight, codes)
        torch.testing.assert_close(weight.dequantize().double(), w64, rtol=0, atol=0)
        cpu = CpuGroupWeight.from_weight(weight)
        uses_kernel = (k if group_size == -1 else min(group_size, k)) % 32 == 0 and k % 32 == 0
        assert (cpu.blocks is not None) == uses_kernel
        if tiles:
            assert cpu.use_tiles() == uses_kernel
        for rows in (1, 8, 33):  # up to 8 rows the kernels' fused path, above it a GEMM
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
            out = cpu.linear(x)
            assert out.shape == (rows, n) and out.dtype == torch.float32
            assert_matmul_close(out, x, w64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("tiles", [False, True], ids=["rows", "tiles"])
def test_cpu_kernel_matches_dequantize(isa, bits, group_size, asym, tiles):
    check_cpu_kernel(bits, group_size, asym, act_order=False, tiles=tiles)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 48], ids=["g32", "g48-fallback"])  # 48: not whole 32-input blocks
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_cpu_act_order_and_fallback_match_dequantize(bits, group_size, asym):
    """The permutation of x and the dequantize-per-call fallback run before / instead of the ISA paths."""
    check_cpu_kernel(bits, group_size, asym, act_order=True)
    if group_size == 48:
        check_cpu_kernel(bits, group_size, asym, act_order=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("tiles", [False, True], ids=["rows", "tiles"])
def test_cpu_int8_activations_are_close(isa, bits, asym, tiles):
    """The int8-activation GGUF path quantizes x per 32 inputs: close (not exact), for decode-sized
    batches (row layout) or any batch (tiles)."""
    weight, codes = random_weight(40, 256, bits, 64, asym, act_order=False, seed=3)
    w64 = reference(weight, codes)
    cpu = CpuGroupWeight.from_weight(weight)
    assert cpu.use_tiles() if tiles else not cpu.tiled
    for rows in (1, 4, 8, 20):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        assert_matmul_close(cpu.linear(x, int8_activations=True), x, w64, rel=2e-2)


def test_leading_dims_and_bfloat16_activations():
    weight, codes = random_weight(9, 128, 4, 32, True, True, seed=5)
    cpu = CpuGroupWeight.from_weight(weight)
    x = torch.randn(2, 3, 128)
    out = cpu.linear(x)
    assert out.shape == (2, 3, 9)
    assert_matmul_close(out.reshape(6, 9), x.reshape(6, 128), reference(weight, codes))
    assert cpu.linear(x.bfloat16()).dtype == torch.bfloat16


def test_bad_layouts_raise_value_errors():
    weight, _ = random_weight(4, 64, 4, 32, True, False, seed=0)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        GroupQuantizedWeight(3, weight.qweight, weight.scales, None, 32, 64)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        GroupQuantizedWeight(4, weight.qweight.int(), weight.scales, None, 32, 64)
    with pytest.raises(ValueError, match="scales must be float16"):
        GroupQuantizedWeight(4, weight.qweight, weight.scales.float(), None, 32, 64)
    with pytest.raises(ValueError, match="zero points must be below"):
        GroupQuantizedWeight(4, weight.qweight, weight.scales, torch.full((4, 2), 16, dtype=torch.uint8), 32, 64)
    with pytest.raises(ValueError, match="group_size=0"):
        GroupQuantizedWeight(4, weight.qweight, weight.scales, None, 0, 64)
    with pytest.raises(ValueError, match="g_idx does not put group_size=32"):
        perm_from_g_idx(torch.zeros(64, dtype=torch.int32), 32)


def test_perm_from_g_idx():
    assert perm_from_g_idx(torch.arange(96) // 32, 32) is None  # groups already contiguous
    g_idx = torch.randperm(80) // 32  # groups of 32, 32 and 16, shuffled
    perm = perm_from_g_idx(g_idx, 32)
    assert torch.equal(g_idx[perm], torch.arange(80) // 32)


# ---------------------------------------------------------------------------------------------
# The weight: tensor-parallel cuts, fused shards, the linear method
# ---------------------------------------------------------------------------------------------


def test_narrow_rows_and_group_aligned_columns_stay_quantized(caplog):
    weight, codes = random_weight(10, 320, 4, 64, True, False, seed=6)
    dense = reference(weight, codes).float()
    rows = weight.narrow(0, 3, 5)
    assert isinstance(rows, GroupQuantizedWeight) and torch.equal(rows.dequantize(), dense[3:8])
    cols = weight.narrow(1, 128, 192)  # groups 2..4, the last one whole
    assert isinstance(cols, GroupQuantizedWeight) and torch.equal(cols.dequantize(), dense[:, 128:])
    with caplog.at_level(logging.WARNING):
        cut = weight.narrow(1, 32, 64)  # mid-group
    assert isinstance(cut, torch.Tensor) and torch.equal(cut, dense[:, 32:96]) and "dequantizing" in caplog.text
    permuted, pcodes = random_weight(10, 128, 8, 32, False, True, seed=7)
    assert isinstance(permuted.narrow(1, 0, 64), torch.Tensor)  # act order scatters inputs over every group
    assert torch.equal(permuted.narrow(0, 0, 4).dequantize(), reference(permuted, pcodes).float()[:4])


def test_fuse_stacks_rows_and_writes_out_implicit_zeros():
    a, ca = random_weight(5, 64, 4, 32, False, False, seed=8)
    b, cb = random_weight(3, 64, 4, 32, True, False, seed=9)
    fused = fuse_group_weights([a, b])
    assert fused is not None and fused.shape == (8, 64)
    assert torch.equal(fused.dequantize(), torch.cat([reference(a, ca), reference(b, cb)]).float())
    c, _ = random_weight(3, 64, 8, 32, False, False, seed=10)
    d, _ = random_weight(3, 64, 4, 64, False, False, seed=10)
    assert fuse_group_weights([a, c]) is None and fuse_group_weights([a, d]) is None


def test_linear_keeps_the_weight_quantized_after_loading():
    weight, codes = random_weight(24, 128, 4, 32, True, True, seed=11)
    layer = Linear(128, 24, bias=True)
    layer.load("weight", weight)
    layer.load("bias", torch.full((24,), 0.25))
    assert isinstance(layer.method, GroupQuantizedLinearMethod) and layer.weight is None
    layer.process_after_loading()
    layer.prepack_for_cpu()  # oneDNN packs dense weights only
    assert isinstance(layer.method, GroupQuantizedLinearMethod) and layer.qweight is None  # repacked into blocks
    assert layer.method.weight_bytes(layer) <= 1.25 * weight.nbytes
    x = torch.randn(4, 128)
    assert_matmul_close(layer(x) - 0.25, x, reference(weight, codes))


def test_merged_layer_fuses_shards_into_one_kernel_call():
    sizes = {"q": 32, "k": 8, "v": 8}
    layer = MergedLinear(96, sizes)
    refs = []
    for i, (shard, size) in enumerate(sizes.items()):
        weight, codes = random_weight(size, 96, 8, 32, i == 1, False, seed=20 + i)
        layer.load_shard(shard, "weight", weight)
        refs.append(reference(weight, codes))
    assert layer.qweight.shape == (48, 96)  # one fused weight
    layer.process_after_loading()
    x = torch.randn(3, 96)
    out = layer(x)
    assert_matmul_close(out, x, torch.cat(refs))
    assert [t.shape[-1] for t in layer.split(out)] == [32, 8, 8]


def test_tensor_parallel_parts_stay_quantized_and_add_up():
    """At tp 2 a column-parallel layer keeps its rows quantized, a row-parallel one its whole input
    groups; the ranks' outputs concatenate / sum to the full layer's. An act-order row-parallel
    weight is dequantized (its inputs scatter over every group)."""
    from pagellm.distributed.parallel_state import ParallelContext
    from pagellm.layers.linear import ParallelStyle

    weight, codes = random_weight(24, 256, 4, 64, True, False, seed=13)
    full = reference(weight, codes)
    x = torch.randn(3, 256)
    columns, partials = [], []
    for rank in range(2):
        ctx = ParallelContext(tp_rank=rank, tp_size=2, tp_group=object())  # shapes only, no collectives
        col = Linear(256, 24, parallel_style=ParallelStyle.COLUMN, parallel=ctx)
        row = Linear(256, 24, parallel_style=ParallelStyle.ROW, parallel=ctx)
        col.load("weight", weight)
        row.load("weight", weight)
        for layer in (col, row):
            assert isinstance(layer.method, GroupQuantizedLinearMethod) and not layer.method.dense
            layer.process_after_loading()
        columns.append(col.method.apply(col, x))
        partials.append(row.method.apply(row, x[:, rank * 128:(rank + 1) * 128]))
    assert_matmul_close(torch.cat(columns, -1), x, full)
    torch.testing.assert_close(partials[0] + partials[1], (x.double() @ full.T).float(), atol=1e-4, rtol=1e-4)
    permuted, _ = random_weight(24, 256, 4, 64, True, True, seed=14)
    row = Linear(256, 24, parallel_style=ParallelStyle.ROW, parallel=ParallelContext(tp_rank=1, tp_size=2, tp_group=object()))
    row.load("weight", permuted)
    assert type(row.method).__name__ == "UnquantizedLinearMethod"
    torch.testing.assert_close(row.weight.data, permuted.dequantize()[:, 128:])


def test_gpu_seam_falls_back_to_dequantize_then_matmul(monkeypatch):
    """`_cuda_linear` is the GPU entry point; without the Triton kernel it is dequantize + F.linear,
    which any device runs (here the CPU). With the kernel: tests/test_triton_quant_matmul.py."""
    monkeypatch.setattr(int_group, "_triton_group_matmul", lambda: None)
    weight, codes = random_weight(12, 64, 4, 32, True, True, seed=12)
    x = torch.randn(3, 64)
    assert_matmul_close(_cuda_linear(x, weight), x, reference(weight, codes))


# ---------------------------------------------------------------------------------------------
# Checkpoints in the on-disk layouts (tests/group_quant_checkpoints.py packs them from the specs)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers; hidden 96 and group size 64 leave a narrower last group."""
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(str(path), hidden=96, heads=4, num_kv_heads=2, vocab_size=256, tie=False)
    return path


CHECKPOINTS = {  # id: (format, bits, group_size, asym, act_order, v1 zeros, g_idx stored)
    "gptq-4bit-g32-asym-act-order-v1": ("gptq", 4, 32, True, True, True, True),
    "gptq-8bit-per-channel-sym-v2-no-g_idx": ("gptq", 8, -1, False, False, False, False),
    "awq-4bit-g64": ("awq", 4, 64, True, False, True, False),
    "pack-quantized-4bit-g32-asym-act-order": ("compressed-tensors", 4, 32, True, True, True, True),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_checkpoint_loads_quantized_and_matches_dequantized(tiny_llama_dir, tmp_path, case):
    from pagellm import LLM, SamplingParams
    from pagellm.loader import iter_weights, resolve_model
    from tests.conftest import assert_engines_near_tie

    fmt, bits, group_size, asym, act_order, v1, g_idx_stored = CHECKPOINTS[case]
    sizes = write_quantized_llama(tiny_llama_dir, tmp_path, fmt, bits, group_size, asym, act_order, v1, g_idx_stored)
    # the loader's unpacking against the values the packer above was given
    kept = dict(iter_weights(resolve_model(str(tmp_path)), torch.float32, quantization="auto"))
    assert {n for n, t in kept.items() if isinstance(t, GroupQuantizedWeight)} == set(sizes["expected"])
    for name, dense in sizes["expected"].items():
        assert kept[name].bits == bits and (kept[name].perm is not None) == act_order
        torch.testing.assert_close(kept[name].dequantize().double(), dense, rtol=1e-7, atol=0)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 5 + i, 17, 30 + 2 * i]} for i in range(3)]
    runs = {}
    for mode in ("auto", "none"):
        llm = LLM(str(tmp_path), skip_tokenizer_init=True, quantization=mode, quiet=True, max_model_len=64,
                  kv_cache_memory=4 << 20)
        model = llm.llm_engine.core.runner.model
        quantized = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, GroupQuantizedLinearMethod)]
        if mode == "auto":
            assert len(quantized) == 2 * 4 and all(m.weight is None and m.qweight is None for m in quantized)
            resident = sum(m.method.weight_bytes(m) for m in quantized)
            perms = sum(m.perm.numel() * 8 for m in quantized if m.perm is not None)
            # act order's permutations are int64 (K,) per fused layer; they weigh a lot only in a model this small
            assert resident - perms <= 1.15 * (sizes["disk_bytes"] - sizes["g_idx_bytes"] * act_order), (resident, sizes)
        else:
            assert not quantized
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
    assert_engines_near_tie(runs["auto"], runs["none"])
    for q_out, d_out in zip(runs["auto"], runs["none"]):
        for a, b in zip(q_out.outputs[0].logprobs, d_out.outputs[0].logprobs):
            for token_id in set(a) & set(b):
                assert abs(a[token_id].logprob - b[token_id].logprob) < 1e-4


@pytest.mark.parametrize("config, match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3 is not supported for gptq; supported: 4, 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format='marlin' is not supported; supported: gptq, gptq_v2"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "version='gemv' is not supported for awq; supported: gemm"),
    ({"quant_method": "awq", "w_bit": 8, "q_group_size": 128}, "bits=8 is not supported for awq"),
])
def test_bad_quantization_configs_raise_value_errors(config, match):
    from pagellm.layers.quantization.registry import plan_quantization

    with pytest.raises(ValueError, match=match):
        plan_quantization("auto", "hf", config)


def test_bad_tensors_raise_value_errors():
    from pagellm.layers.quantization.awq import AWQFormat
    from pagellm.layers.quantization.gptq import GPTQFormat

    gptq = GPTQFormat.from_config({"bits": 4, "group_size": 32})
    parts = {"qweight": torch.zeros(8, 16, dtype=torch.int32), "qzeros": torch.zeros(2, 2, dtype=torch.int32),
             "scales": torch.ones(2, 16, dtype=torch.float16)}
    assert gptq.build("p", parts).shape == (16, 64)
    with pytest.raises(ValueError, match=r"scales has shape \(3, 16\), expected \(2, 16\)"):
        gptq.build("p", {**parts, "scales": torch.ones(3, 16, dtype=torch.float16)})
    with pytest.raises(ValueError, match="qweight and qzeros must be int32"):
        gptq.build("p", {**parts, "qweight": parts["qweight"].float()})
    with pytest.raises(ValueError, match="missing tensors p.qzeros"):
        gptq.build("p", {k: v for k, v in parts.items() if k != "qzeros"})
    with pytest.raises(ValueError, match="g_idx does not put"):
        gptq.build("p", {**parts, "g_idx": torch.zeros(64, dtype=torch.int32)})
    awq = AWQFormat.from_config({"bits": 4, "group_size": 32, "version": "GEMM"})
    with pytest.raises(ValueError, match=r"qzeros has shape \(2, 3\), expected \(2, 2\)"):
        awq.build("p", {"qweight": torch.zeros(64, 2, dtype=torch.int32), "qzeros": torch.zeros(2, 3, dtype=torch.int32),
                        "scales": torch.ones(2, 16, dtype=torch.float16)})


def test_awq_nibble_order():
    """One word, each nibble a different value: column j of the 8 is the nibble AutoAWQ put it in."""
    from pagellm.layers.quantization.awq import unpack_awq

    columns = torch.arange(8).reshape(1, 8) + 3
    assert torch.equal(unpack_awq(pack_awq(columns)).long(), columns)
    word = sum(int(columns[0, AWQ_NIBBLE_COLUMNS[i]]) << (4 * i) for i in range(8))
    assert int(pack_awq(columns).item()) & 0xFFFFFFFF == word


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized tensors, in their exact layout
# ---------------------------------------------------------------------------------------------


def pack_quantized_parts(n: int, k: int, bits: int, group_size: int, asym: bool, packed_zero: bool,
                         act_order: bool, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' tensors of one layer (signed codes stored + 2^(bits-1), packed along K,
    bfloat16 scales) and the float64 weight they stand for."""
    gen = torch.Generator().manual_seed(seed)
    offset = 1 << (bits - 1)
    signed = torch.randint(-offset, offset, (n, k), generator=gen)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    scale = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).bfloat16()
    g_idx = act_order_g_idx(k, g, seed) if act_order else (torch.arange(k) // g).to(torch.int32)
    parts = {"weight_packed": pack_low_bits_first(signed + offset, bits, dim=1), "weight_scale": scale,
             "weight_shape": torch.tensor([n, k])}
    zp = torch.zeros(n, groups, dtype=torch.int64)
    if asym:
        zp = torch.randint(-offset, offset, (n, groups), generator=gen)
        parts["weight_zero_point"] = (pack_low_bits_first(zp + offset, bits, dim=0) if packed_zero
                                      else zp.to(torch.int8))
    if act_order:
        parts["weight_g_idx"] = g_idx
    gi = g_idx.long()
    return parts, (signed - zp[:, gi]).double() * scale.double()[:, gi]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["group-sym", "group-asym-packed-zp", "group-asym-int8-zp", "channel", "act-order"])
def test_pack_quantized_builds_the_weight_it_stores(bits, layout):
    from pagellm.layers.quantization.compressed_pack import build_pack_quantized

    asym = "asym" in layout
    group_size = -1 if layout == "channel" else 32
    n, k = 20, 96 + 8  # K not a multiple of 32/bits words: the last int32 is padded
    parts, dense = pack_quantized_parts(n, k, bits, group_size, asym, "packed" in layout, layout == "act-order", seed=bits)
    weight = build_pack_quantized(parts, bits, None if layout == "channel" else 32, not asym,
                                  "channel" if layout == "channel" else "group", "group" if layout == "act-order" else None)
    assert weight.shape == (n, k) and weight.bits == bits and weight.symmetric == (not asym)
    torch.testing.assert_close(weight.dequantize().double(), dense, rtol=1e-7, atol=0)
    x = torch.randn(5, k)
    assert_matmul_close(CpuGroupWeight.from_weight(weight).linear(x), x, dense)


def test_pack_quantized_bad_settings_raise_value_errors():
    from pagellm.layers.quantization.compressed_pack import build_pack_quantized

    parts, _ = pack_quantized_parts(8, 64, 4, 32, True, True, False, seed=0)
    with pytest.raises(ValueError, match="num_bits=2 is not supported"):
        build_pack_quantized(parts, 2, 32, False, "group", None)
    with pytest.raises(ValueError, match="strategy 'tensor' is not supported"):
        build_pack_quantized(parts, 4, 32, False, "tensor", None)
    with pytest.raises(ValueError, match="needs weight_zero_point"):
        build_pack_quantized({k: v for k, v in parts.items() if k != "weight_zero_point"}, 4, 32, False, "group", None)
    with pytest.raises(ValueError, match="needs weight_g_idx"):
        build_pack_quantized(parts, 4, 32, False, "group", "group")
    with pytest.raises(ValueError, match="weight_scale has shape"):
        build_pack_quantized(parts, 4, 16, False, "group", None)
