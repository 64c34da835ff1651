"""8-bit weights kept quantized (int8, FP8): the C++ kernels on every ISA path against their
dequantize-then-matmul references, the weights' narrow/fuse, the layers' methods."""

from __future__ import annotations

import pytest
import torch

from pagellm.layers.linear import Linear, MergedLinear
from pagellm.layers.quantization.w8 import (
    FP8LinearMethod,
    FP8Weight,
    Int8LinearMethod,
    Int8Weight,
    W8A8_KERNEL_MAX_ROWS,
    quantize_rows_int8,
)
from pagellm.ops import w8_cpu
from tests.conftest import isa_fixture

SHAPES = [(1, 7, 13), (2, 9, 100), (3, 33, 577), (8, 64, 64), (17, 40, 576), (64, 20, 130)]  # (M, N, K)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert w8_cpu.load_w8_ops(), "the 8-bit weight C++ kernels failed to build"


isa = isa_fixture(w8_cpu)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_matmul_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 accumulation in any order against a float64 reference: a few ulp of the magnitude."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    scale = ref.abs().max().item() + 1e-30
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-6 * scale, f"max error {err} vs magnitude {scale}"


def fp8_codes(shape, seed: int) -> torch.Tensor:
    """Every finite e4m3 byte (NaN 0x7f / 0xff excluded), subnormals included."""
    raw = torch.randint(0, 256, shape, generator=_gen(seed), dtype=torch.int16)
    raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw).to(torch.uint8)
    return raw.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_w8a16_int8_kernel(isa, M, N, K):
    codes = torch.randint(-128, 128, (N, K), generator=_gen(1), dtype=torch.int8)
    scale = torch.rand(N, generator=_gen(2)) + 0.05
    x = torch.randn(M, K, generator=_gen(3))
    out = w8_cpu.w8a16_linear(x, codes, scale[:, None].contiguous(), K)
    assert_matmul_close(out, x.double() @ Int8Weight(codes, scale).dequantize().double().T)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("group", [None, 48])  # 48: a short last group for most K
def test_w8a16_fp8_kernel_with_group_scales(isa, M, N, K, group):
    codes = fp8_codes((N, K), 4)
    gs = K if group is None else group
    scale = torch.rand(N, -(-K // gs), generator=_gen(5)) + 0.05
    x = torch.randn(M, K, generator=_gen(6))
    out = w8_cpu.w8a16_linear(x, codes, scale, gs)
    ref = codes.double() * scale.double().repeat_interleave(gs, 1)[:, :K]
    assert_matmul_close(out, x.double() @ ref.T)


def test_fp8_decode_covers_every_byte(isa):
    """The kernel's e4m3 expansion (float16 bit trick / scalar formula) matches torch on all 254 finite codes."""
    codes = torch.arange(256, dtype=torch.int16)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8).view(torch.float8_e4m3fn).reshape(-1, 1)
    eye = torch.ones(1, 1)
    got = w8_cpu.w8a16_linear(eye, codes, torch.ones(codes.shape[0], 1), 1)
    assert torch.equal(got[0], codes.float()[:, 0])


@pytest.mark.parametrize("M,N,K", SHAPES)
# min_code: a -128 code somewhere (the AVX2 path widens to int16); static: one input scale, clamped
@pytest.mark.parametrize("static,min_code", [(False, False), (False, True), (True, True)])
def test_w8a8_kernel_quantizes_activations_like_the_reference(isa, M, N, K, static, min_code):
    codes = torch.randint(-128 if min_code else -127, 128, (N, K), generator=_gen(7), dtype=torch.int8)
    if min_code:
        codes[0, 0] = -128
    scale = torch.rand(N, generator=_gen(8)) + 0.05
    x = torch.randn(M, K, generator=_gen(9)) * 3
    x[0, : K // 2] = 0  # a partly zero row
    if M > 1:
        x[1] = 0  # an all-zero row (dynamic scale 1, output 0)
    input_scale = torch.tensor(0.02) if static else None  # static: clamps at [-128, 127]
    q, sx = quantize_rows_int8(x, input_scale)
    ref = (q.double() @ codes.double().T) * sx.double() * scale.double()
    out = w8_cpu.w8a8_linear(x, codes, scale, codes.sum(1, dtype=torch.int32), min_code,
                             None if input_scale is None else float(input_scale))
    assert_matmul_close(out, ref)


def test_w8a8_avx512_uses_vnni_where_present():
    if "avx512" not in w8_cpu.supported_isas():
        pytest.skip("this CPU has no avx512")
    with open("/proc/cpuinfo") as f:
        assert w8_cpu.has_vnni() == ("avx512_vnni" in f.read())


def test_kernels_reject_bad_inputs():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="activations have 9 columns"):
        w8_cpu.w8a16_linear(torch.zeros(1, 9), codes, torch.ones(4, 1), 8)
    with pytest.raises(RuntimeError, match="does not give"):
        w8_cpu.w8a16_linear(torch.zeros(1, 8), codes, torch.ones(4, 1), 3)
    with pytest.raises(RuntimeError, match="int8 or float8_e4m3fn"):
        w8_cpu.w8a16_linear(torch.zeros(1, 8), codes.float(), torch.ones(4, 1), 8)


# ---- weights: dequantize, narrow, fuse ---------------------------------------------------------

def _fp8_weight(N: int, K: int, kind: str, seed: int = 0) -> FP8Weight:
    codes = (torch.randn(N, K, generator=_gen(seed)) * 4).to(torch.float8_e4m3fn)
    if kind == "tensor":
        return FP8Weight(codes, torch.tensor(0.01 + seed * 1e-3))
    if kind == "channel":
        return FP8Weight(codes, torch.rand(N, generator=_gen(seed + 1)) + 0.01)
    return FP8Weight(codes, torch.rand(-(-N // 16), -(-K // 32), generator=_gen(seed + 1)) + 0.01, block=(16, 32))


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_fp8_weight_narrow_keeps_blocks(kind):
    w = _fp8_weight(48, 96, kind)
    full = w.dequantize()
    for dim, start, length in [(0, 16, 32), (1, 32, 64), (0, 32, 16), (1, 64, 32)]:
        part = w.narrow(dim, start, length)
        assert isinstance(part, FP8Weight)
        assert torch.equal(part.dequantize(), full.narrow(dim, start, length))
    if kind == "block":  # a cut inside a block: dequantized (with a warning), same values
        part = w.narrow(1, 8, 40)
        assert isinstance(part, torch.Tensor) and torch.equal(part, full.narrow(1, 8, 40))
    w_int8 = Int8Weight(torch.randint(-128, 128, (6, 10), dtype=torch.int8), torch.rand(6))
    assert torch.equal(w_int8.narrow(0, 2, 3).dequantize(), w_int8.dequantize()[2:5])
    assert torch.equal(w_int8.narrow(1, 3, 5).dequantize(), w_int8.dequantize()[:, 3:8])


def test_bad_weights_raise_clear_errors():
    with pytest.raises(ValueError, match="needs scales of shape"):
        FP8Weight(torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(2, 2), block=(4, 4))
    with pytest.raises(ValueError, match="expected one per output row"):
        Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="static activation scheme needs an input_scale"):
        Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), "static")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        FP8Weight(torch.zeros(4, 8), torch.ones(()))


def _merged_with(parts, cls) -> MergedLinear:
    sizes = {f"s{i}": p.shape[0] for i, p in enumerate(parts)}
    layer = MergedLinear(parts[0].shape[1], sizes)
    for i, p in enumerate(parts):
        layer.load_shard(f"s{i}", "weight", p)
    assert isinstance(layer.method, cls) and not layer.method.dense and layer.weight is None
    layer.process_after_loading()
    return layer


@pytest.mark.parametrize("kinds", [("tensor", "tensor"), ("channel", "tensor"), ("block", "block")])
def test_fp8_merged_shards_fuse_into_one_weight(kinds):
    parts = [_fp8_weight(32, 64, k, seed=i) for i, k in enumerate(kinds)] + [_fp8_weight(16, 64, kinds[-1], seed=5)]
    layer = _merged_with(parts, FP8LinearMethod)
    assert layer.qweight.shape == (80, 64)
    if kinds == ("tensor", "tensor"):  # different per-tensor scales: per-row scales
        assert layer.weight_scale.shape == (80,)
    x = torch.randn(3, 64, generator=_gen(11))
    ref = x.double() @ torch.cat([p.dequantize() for p in parts]).double().T
    assert_matmul_close(layer(x), ref)


@pytest.mark.parametrize("scheme", [None, "dynamic", "static"])
@pytest.mark.parametrize("rows", [1, W8A8_KERNEL_MAX_ROWS + 3])  # the C++ kernel, then torch._int_mm
def test_int8_layer_matches_its_reference(scheme, rows):
    parts = [Int8Weight(torch.randint(-128, 128, (n, 48), generator=_gen(n), dtype=torch.int8),
                        torch.rand(n, generator=_gen(n + 1)) + 0.01, scheme,
                        torch.tensor(0.01 * n) if scheme == "static" else None) for n in (16, 8, 8)]
    layer = _merged_with(parts, Int8LinearMethod)
    x = torch.randn(rows, 48, generator=_gen(12)).to(torch.bfloat16)
    w = torch.cat([p.dequantize() for p in parts]).double()
    if scheme is None:
        ref = x.double() @ w.T
    else:  # the fused static scale is the shards' largest
        q, sx = quantize_rows_int8(x.float(), torch.tensor(0.16) if scheme == "static" else None)
        ref = (q.double() * sx.double()) @ w.T
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), rtol=1e-2,
                               atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["int8", "fp8-channel", "fp8-block"])
def test_tensor_parallel_parts_stay_quantized(kind):
    """Each rank's row- or column-parallel part is still quantized and the parts add up to the whole."""
    from pagellm.distributed.parallel_state import ParallelContext
    from pagellm.layers.linear import ParallelStyle

    N, K = 64, 128
    if kind == "int8":
        weight = Int8Weight(torch.randint(-128, 128, (N, K), generator=_gen(20), dtype=torch.int8), torch.rand(N) + 0.1)
    elif kind == "fp8-channel":
        weight = _fp8_weight(N, K, "channel", seed=3)
    else:  # (32, 32) blocks: halves of either dim are whole blocks
        codes = (torch.randn(N, K, generator=_gen(21)) * 4).to(torch.float8_e4m3fn)
        weight = FP8Weight(codes, torch.rand(2, 4, generator=_gen(23)) + 0.1, block=(32, 32))
    x = torch.randn(3, K, generator=_gen(22))
    ref = x.double() @ weight.dequantize().double().T
    row_parts, col_parts = [], []
    for rank in (0, 1):
        ctx = ParallelContext(tp_rank=rank, tp_size=2, tp_group=object())
        row = Linear(K, N, parallel_style=ParallelStyle.ROW, parallel=ctx)
        col = Linear(K, N, parallel_style=ParallelStyle.COLUMN, parallel=ctx)
        for layer in (row, col):
            layer.load("weight", weight)
            assert layer.weight is None and type(layer.method).__name__.endswith("LinearMethod")
            assert not getattr(layer.method, "dense", False)
            layer.process_after_loading()
        assert row.qweight.shape == (N, K // 2) and col.qweight.shape == (N // 2, K)
        row_parts.append(row.method.apply(row, x[:, rank * K // 2:(rank + 1) * K // 2], skip_bias=True))
        col_parts.append(col.method.apply(col, x, skip_bias=True))
    assert_matmul_close(row_parts[0] + row_parts[1], ref)
    assert_matmul_close(torch.cat(col_parts, dim=-1), ref)


def test_mixed_shards_fall_back_to_dense():
    parts = [Int8Weight(torch.ones(4, 8, dtype=torch.int8), torch.ones(4)), _fp8_weight(4, 8, "tensor")]
    layer = MergedLinear(8, {"a": 4, "b": 4})
    layer.load_shard("a", "weight", parts[0])
    layer.load_shard("b", "weight", parts[1])
    assert layer.method.dense
    torch.testing.assert_close(layer.weight.float(), torch.cat([p.dequantize() for p in parts]))


def test_linear_reports_quantized_bytes():
    layer = Linear(64, 32)
    layer.load("weight", Int8Weight(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32)))
    assert layer.method.weight_bytes(layer) == 32 * 64 + 4 * 32


# ---- checkpoints in each format's on-disk layout, loaded by the engine ---------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from pagellm import LLM, SamplingParams  # noqa: E402
from pagellm.layers.embedding import LMHead  # noqa: E402
from tests.conftest import assert_engines_near_tie, make_tiny_llama  # noqa: E402

PROMPTS = [{"prompt_token_ids": [1, 5 + 3 * i, 17, 30 + 2 * i, 9]} for i in range(3)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=5, ignore_eos=True)
ENGINE = dict(skip_tokenizer_init=True, quiet=True, max_model_len=64, kv_cache_memory=2 << 20)


def _row_amax(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(1).clamp(min=1e-8)


def _quantize_tensors(kind: str, prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One linear weight as the format's writer stores it."""
    N, K = w.shape
    if kind.startswith("fp8"):
        if kind == "fp8-block":  # 32 x 48 blocks: ragged last column block (K = 64, 128)
            bn, bk = 32, 48
            blocks = torch.nn.functional.pad(w, (0, -K % bk, 0, -N % bn)).reshape(-(-N // bn), bn, -(-K // bk), bk)
            s = (blocks.abs().amax((1, 3)) / 448).clamp(min=1e-8)
            full = s.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
            return {f"{prefix}.weight": (w / full).to(torch.float8_e4m3fn), f"{prefix}.weight_scale_inv": s}
        per_tensor = kind in ("fp8-tensor",)
        s = (w.abs().amax() if per_tensor else _row_amax(w)) / 448
        out = {f"{prefix}.weight": (w / (s if per_tensor else s[:, None])).to(torch.float8_e4m3fn),
               f"{prefix}.weight_scale": s.reshape(()) if per_tensor else s[:, None]}
        if kind == "fp8-tensor":  # static activations
            out[f"{prefix}.input_scale"] = torch.tensor([0.02])
        return out
    if kind == "ct-fp8":  # float-quantized, channel strategy, dynamic per-token activations
        s = _row_amax(w) / 448
        return {f"{prefix}.weight": (w / s[:, None]).to(torch.float8_e4m3fn),
                f"{prefix}.weight_scale": s[:, None].to(torch.bfloat16)}
    if kind == "ct-w8a16":  # int-quantized, group strategy (32 columns), weight-only
        g = w.reshape(N, K // 32, 32)
        s = (g.abs().amax(-1) / 127).clamp(min=1e-8).to(torch.bfloat16)
        codes = torch.round(g / s.float()[..., None]).clamp(-128, 127).to(torch.int8).reshape(N, K)
        return {f"{prefix}.weight": codes, f"{prefix}.weight_scale": s,
                f"{prefix}.weight_zero_point": torch.zeros(N, K // 32, dtype=torch.int8)}
    s = (_row_amax(w) / 127).to(torch.bfloat16)  # ct-int8: int-quantized, channel strategy
    codes = torch.round(w / s.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return {f"{prefix}.weight": codes, f"{prefix}.weight_scale": s[:, None]}


def _ct_config(kind: str) -> dict:
    weights = {"num_bits": 8, "type": "float" if kind == "ct-fp8" else "int", "symmetric": True,
               "strategy": "group" if kind == "ct-w8a16" else "channel",
               "group_size": 32 if kind == "ct-w8a16" else None, "dynamic": False, "block_structure": None}
    acts = None if kind == "ct-w8a16" else {"num_bits": 8, "type": weights["type"], "symmetric": True,
                                            "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized" if kind == "ct-fp8" else "int-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}}}


def _quant_config(kind: str) -> dict:
    if kind == "fp8-tensor":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    if kind == "fp8-channel":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if kind == "fp8-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 48]}
    return _ct_config(kind)


def write_quantized_checkpoint(src: str, dst: Path, kind: str, quant_config: dict | None = None) -> str:
    """The tiny Llama at `src` re-saved with its decoder linear weights in `kind`'s layout."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(f"{src}/model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors.update(_quantize_tensors(kind, name.rpartition(".")[0], t.float()))
        else:
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(Path(src, "config.json").read_text())
    config["quantization_config"] = quant_config if quant_config is not None else _quant_config(kind)
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("w8-tiny")), seed=5, vocab_size=256, hidden=64, tie=False)


def _methods(llm) -> set[str]:
    model = llm.llm_engine.core.runner.model
    return {type(m.method).__name__ for m in model.modules() if isinstance(m, (Linear, LMHead))}


def assert_logprobs_match(got, ref, tol: float, margin: float) -> None:
    """Shared top-5 logprobs within `tol`; greedy tokens identical up to a first divergence where
    the reference's top-2 logprobs are within `margin` (a near-tie; later steps are not compared)."""
    for g, r in zip(got, ref):
        a, b = g.outputs[0], r.outputs[0]
        for step, (la, lb) in enumerate(zip(a.logprobs, b.logprobs)):
            for token in set(la) & set(lb):
                assert abs(la[token].logprob - lb[token].logprob) < tol, (step, token)
            if a.token_ids[step] != b.token_ids[step]:
                top2 = sorted((lp.logprob for lp in lb.values()), reverse=True)[:2]
                assert top2[0] - top2[1] < margin, f"real divergence at step {step}: {top2}"
                break


# kind -> (the method the layers get, logprob tolerance, near-tie margin); W8A8 int8 also
# quantizes activations, so it is further from the dequantized model than weight-only kinds.
KINDS = {
    "fp8-tensor": ("FP8LinearMethod", 1e-4, 1e-3),  # measured: 3e-6 (float summation order)
    "fp8-channel": ("FP8LinearMethod", 1e-4, 1e-3),
    "fp8-block": ("FP8LinearMethod", 1e-4, 1e-3),
    "ct-int8": ("Int8LinearMethod", 0.15, 0.2),  # measured: 0.1
    "ct-w8a16": ("Int8LinearMethod", 1e-4, 1e-3),
    "ct-fp8": ("FP8LinearMethod", 1e-4, 1e-3),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_checkpoint_formats_match_their_dequantized_model(tiny_fp32, tmp_path, kind):
    method, tol, margin = KINDS[kind]
    path = write_quantized_checkpoint(tiny_fp32, tmp_path / kind, kind)
    llm = LLM(path, **ENGINE)
    assert _methods(llm) == {method, "CpuPackedLinearMethod"}  # the LM head stays dense
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ref_llm = LLM(path, quantization="none", **ENGINE)
    assert "FP8LinearMethod" not in _methods(ref_llm) and "Int8LinearMethod" not in _methods(ref_llm)
    assert_logprobs_match(got, ref_llm.generate(PROMPTS, GREEDY, use_tqdm=False), tol, margin)


BAD_CONFIGS = [
    ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme 'sometimes' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive integers"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not supported"),
    ({**_ct_config("ct-int8"), "sparsity_config": {"format": "sparse-24-bitmask"}}, "2:4 sparsity"),
    ({**_ct_config("ct-int8"), "format": "marlin-24"}, "format 'marlin-24'.*supported: int-quantized"),
    ({**_ct_config("ct-int8"), "config_groups": {"g": {"weights": {"num_bits": 3, "type": "int"},
                                                       "format": "pack-quantized"}}}, "3-bit int"),
    ({**_ct_config("ct-int8"), "config_groups": {}}, "no config_groups"),
    ({**_ct_config("ct-w8a16"), "config_groups": {"g": {"weights": {"num_bits": 8, "strategy": "group"}}}},
     "strategy group but group_size None"),
]


@pytest.mark.parametrize("config,message", BAD_CONFIGS)
def test_bad_quantization_configs_raise_clear_errors(config, message):
    from pagellm.layers.quantization.registry import plan_quantization

    with pytest.raises(ValueError, match=message):
        plan_quantization("auto", "hf", config)


def test_bad_checkpoint_tensors_name_the_layer(tiny_fp32, tmp_path):
    path = write_quantized_checkpoint(tiny_fp32, tmp_path / "bad", "fp8-channel",
                                      {"quant_method": "fp8", "activation_scheme": "static"})
    with pytest.raises(ValueError, match=r"fp8 weight model\.layers\.\d\.\w+\.\w+_proj: .*no input_scale"):
        LLM(path, **ENGINE)


def test_compressed_tensors_groups_static_scales_and_ignore():
    from pagellm.layers.quantization.compressed_tensors import CompressedTensorsFormat

    config = _ct_config("ct-int8")
    static = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "tensor"}
    weights = {**config["config_groups"]["group_0"]["weights"], "strategy": "tensor"}
    config["config_groups"]["attn"] = {"targets": ["re:.*self_attn\\..*_proj$"], "input_activations": static,
                                       "weights": weights}
    config["ignore"] = ["lm_head", "re:.*layers\\.1\\.mlp\\..*"]
    fmt = CompressedTensorsFormat.from_config(config)
    codes = torch.randint(-128, 128, (4, 8), dtype=torch.int8)
    parts = {"weight": codes, "weight_scale": torch.tensor([0.5]), "input_scale": torch.tensor([0.1]),
             "input_zero_point": torch.zeros(1, dtype=torch.int8)}
    attn = fmt.build("model.layers.0.self_attn.q_proj", parts)  # the named group wins over "Linear"
    assert isinstance(attn, Int8Weight) and attn.activation == "static"
    assert float(attn.input_scale) == pytest.approx(0.1)
    assert torch.equal(attn.dequantize(), codes.float() * 0.5)
    mlp = fmt.build("model.layers.0.mlp.up_proj", {"weight": codes, "weight_scale": torch.ones(4, 1)})
    assert mlp.activation == "dynamic"
    with pytest.raises(ValueError, match="in quantization_config.ignore"):
        fmt.build("model.layers.1.mlp.up_proj", parts)
    with pytest.raises(ValueError, match="nonzero input_zero_point"):
        fmt.build("model.layers.0.self_attn.k_proj", {**parts, "input_zero_point": torch.ones(1, dtype=torch.int8)})
    with pytest.raises(ValueError, match="expected int8"):
        fmt.build("model.layers.0.mlp.up_proj", {"weight": codes.float(), "weight_scale": torch.ones(4, 1)})


def test_pack_quantized_dispatches_to_its_builder(monkeypatch):
    import sys
    import types

    from pagellm.layers.quantization.compressed_tensors import CompressedTensorsFormat

    config = {**_ct_config("ct-w8a16"), "format": "pack-quantized"}
    config["config_groups"]["group_0"]["weights"].update(num_bits=4, strategy="group", group_size=32)
    fmt = CompressedTensorsFormat.from_config(config)
    assert {"weight_packed", "weight_shape", "weight_g_idx", "weight_zero_point"} <= set(fmt.part_suffixes())
    calls = []
    fake = types.ModuleType("pagellm.layers.quantization.compressed_pack")
    fake.build_pack_quantized = lambda parts, *args: calls.append((sorted(parts), args)) or "built"
    monkeypatch.setitem(sys.modules, "pagellm.layers.quantization.compressed_pack", fake)
    parts = {"weight_packed": torch.zeros(1), "weight_scale": torch.ones(1)}
    assert fmt.build("model.layers.0.mlp.up_proj", parts) == "built"
    assert calls == [(["weight_packed", "weight_scale"], (4, 32, True, "group", None))]
    monkeypatch.setitem(sys.modules, "pagellm.layers.quantization.compressed_pack", None)  # import fails
    with pytest.raises(ValueError, match="pack-quantized weights need pagellm.layers.quantization.compressed_pack"):
        fmt.build("model.layers.0.mlp.up_proj", {"weight_packed": torch.zeros(1)})


# ---- online quantization of a full-precision checkpoint ---------------------------------------

def _linear_weight_bytes(llm) -> tuple[int, int]:
    """(bytes the decoder linear layers hold, their fp32 bytes)."""
    model = llm.llm_engine.core.runner.model
    layers = [m for m in model.modules() if type(m).__name__ in ("Linear", "MergedLinear")]
    held = sum(m.method.weight_bytes(m) if hasattr(m.method, "weight_bytes") else m.weight.numel() * 4 for m in layers)
    return held, sum(m.in_features * sum(m.shard_offsets[s][1] for s in m.shard_offsets) * 4
                     if hasattr(m, "shard_offsets") else m.in_features * m.out_features * 4 for m in layers)


@pytest.fixture(scope="module")
def full_precision_runs(tiny_fp32) -> dict:
    """dtype -> the unquantized engine's greedy outputs (computed once per dtype)."""
    runs: dict = {}

    def get(dtype: str):
        if dtype not in runs:
            runs[dtype] = LLM(tiny_fp32, dtype=dtype, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
        return runs[dtype]
    return get


@pytest.mark.parametrize("method,dtype", [("int8", "float32"), ("fp8", "float32"), ("int8", "bfloat16"),
                                          ("fp8", "bfloat16")])
def test_online_quantization_is_close_to_full_precision(tiny_fp32, full_precision_runs, method, dtype):
    ref = full_precision_runs(dtype)
    llm = LLM(tiny_fp32, dtype=dtype, quantization=method, **ENGINE)
    assert _methods(llm) == {"Int8LinearMethod" if method == "int8" else "FP8LinearMethod", "CpuPackedLinearMethod"}
    held, fp32 = _linear_weight_bytes(llm)
    assert 0.25 <= held / fp32 <= 0.27, (held, fp32)  # 1 byte per weight + a float32 scale per row
    assert_engines_near_tie(llm.generate(PROMPTS, GREEDY, use_tqdm=False), ref, max_near_ties=2)


def test_online_quantization_is_for_full_precision_checkpoints(tiny_fp32, tmp_path):
    path = write_quantized_checkpoint(tiny_fp32, tmp_path / "fp8", "fp8-channel")
    with pytest.raises(ValueError, match="--quantization int8 does not match the checkpoint"):
        LLM(path, quantization="int8", **ENGINE)
