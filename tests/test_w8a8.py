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

SHAPES = [(1, 7, 13), (3, 33, 577), (5, 9, 100), (8, 64, 64), (17, 40, 576), (64, 20, 130)]  # (M, N, K)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert w8_cpu.load_w8_ops(), "the 8-bit weight C++ kernels failed to build"


@pytest.fixture(params=list(w8_cpu.ISA_NAMES))
def isa(request, monkeypatch) -> str:
    """Forces one kernel path through the real dispatch; only a path this CPU lacks is skipped."""
    if request.param not in w8_cpu.supported_isas():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv(w8_cpu.ISA_ENV, request.param)
    assert w8_cpu.active_isa() == request.param
    return request.param


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
@pytest.mark.parametrize("group", [None, 32, 128])
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
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("min_code", [False, True])  # a -128 code: the AVX2 path widens to int16
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
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())


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
