"""Triton quantized matmuls (W4A16 / W8A16 group GEMM, W8A8, FP8) against dequantize-then-matmul in fp32.

Without a GPU the kernels run through Triton's CPU interpreter at small, ragged shapes: TRITON_INTERPRET=1
is read when triton is first imported, so every kernel case runs in one child process (this file run as a
script) and each case's verdict comes back as JSON. With a GPU the same cases and Llama-8B-sized ones run
in-process. The GGUF repacks are plain torch and are checked in-process against gguf's own dequantize.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()

SHAPES = list(itertools.product((1, 3, 17), (40, 96), (64, 160)))  # (M, N, K): ragged against every tile
QUANT_CONFIGS = list(itertools.product((4, 8), (32, -1), (None, "codes", "float")))  # bits, group, zeros
DTYPES = ("float32", "float16", "bfloat16")
# Forced small tiles: several tiles per dimension, ragged edges, split-K with a partly empty last split,
# and a K step (64) that spans two 32-groups (the per-weight scale path).
SMALL_TILES = dict(block_m=16, block_n=32, block_k=32, split_k=2)
WIDE_K_TILES = dict(block_m=16, block_n=32, block_k=64, split_k=3)


def _group_cases() -> dict[str, dict]:
    """Each quant config at two of the twelve shapes (every shape twice), dtype and tiles rotating too."""
    cases = {}
    for i, (bits, group, zeros) in enumerate(QUANT_CONFIGS):
        for j in range(2):
            m, n, k = SHAPES[(2 * i + j) % len(SHAPES)]
            tiles = (None, SMALL_TILES, WIDE_K_TILES)[(i + j) % 3]
            cases[f"group_b{bits}_g{group}_z{zeros}_{m}x{n}x{k}"] = dict(
                kind="group", m=m, n=n, k=k, bits=bits, group=group, zeros=zeros, dtype=DTYPES[(i + 2 * j) % 3],
                tiles=tiles, strided=i % 3 == j)
    return cases


CPU_CASES: dict[str, dict] = _group_cases()
CPU_CASES.update({
    f"quant_int8_{m}x{k}_{dtype}": dict(kind="quantize", m=m, k=k, dtype=dtype)
    for (m, k), dtype in zip([(1, 64), (17, 160), (3, 2500), (2, 7)], DTYPES + ("float32",))
})
CPU_CASES.update({
    f"int8_mm_{m}x{n}x{k}_{i}": dict(kind="int8", m=m, n=n, k=k, per_row=i % 2 == 0, bias=i % 3 == 0,
                                     out_dtype=DTYPES[i % 3], tiles=(None, SMALL_TILES)[i % 2])
    for i, (m, n, k) in enumerate(SHAPES[::3])
})
CPU_CASES.update({
    f"fp8_{m}x{n}x{k}_{i}": dict(kind="fp8", m=m, n=n, k=k, per_channel=i % 2 == 0, bias=i < 2,
                                 dtype=DTYPES[i % 3], tiles=(SMALL_TILES, None)[i % 2])
    for i, (m, n, k) in enumerate(SHAPES[1::3])
})
# The heuristic's own split-K (a decode row against few output columns) and its 128 x 128 prefill tile.
CPU_CASES["group_heuristic_split_1x64x1024"] = dict(kind="group", m=1, n=64, k=1024, bits=4, group=128, zeros="codes",
                                                   dtype="float16", tiles=None)
CPU_CASES["group_heuristic_prefill_70x40x128"] = dict(kind="group", m=70, n=40, k=128, bits=8, group=64, zeros=None,
                                                     dtype="bfloat16", tiles=None)
CPU_CASES["int8_heuristic_split_2x64x2048"] = dict(kind="int8", m=2, n=64, k=2048, per_row=True, bias=True,
                                                  out_dtype="bfloat16", tiles=None)
# A group that does not divide K (groups of 64, 64, 32; GPTQ's narrower last group), one wider than K.
CPU_CASES["group_ragged_last_group_3x40x160"] = dict(kind="group", m=3, n=40, k=160, bits=4, group=64, zeros="codes",
                                                    dtype="float32", tiles=SMALL_TILES)
CPU_CASES["group_ragged_last_group_17x96x96"] = dict(kind="group", m=17, n=96, k=96, bits=8, group=64, zeros="float",
                                                    dtype="float16", tiles=None)
CPU_CASES["group_wider_than_k_1x40x64"] = dict(kind="group", m=1, n=40, k=64, bits=4, group=128, zeros=None,
                                               dtype="bfloat16", tiles=None)
CPU_CASES["fp8_decode_all_256_codes"] = dict(kind="fp8_codes")
CPU_CASES["gguf_q4_1_matmul"] = dict(kind="gguf", m=5, n=24, k=96, fmt="q4_1")
CPU_CASES["gguf_q4_0_matmul"] = dict(kind="gguf", m=17, n=40, k=64, fmt="q4_0")
CPU_CASES["gguf_q8_0_matmul"] = dict(kind="gguf", m=3, n=40, k=160, fmt="q8_0")
CPU_CASES["int_group_seam_act_order_asym"] = dict(kind="int_group_seam", m=3, n=24, k=128, group=32)
CPU_CASES["gguf_method_q4_1_fused"] = dict(kind="gguf_method", m=3, n=[40], k=96, fmts=["q4_1"])
CPU_CASES["gguf_method_mixed_parts"] = dict(kind="gguf_method", m=2, n=[32, 8], k=64, fmts=["q4_0", "q5_0"])

# Llama-3.1-8B projections (q/o, gate/up, down) at decode and prefill sizes.
LLAMA_8B_NK = [(4096, 4096), (28672, 4096), (4096, 14336)]
GPU_CASES: dict[str, dict] = {}
for (n, k), m in itertools.product(LLAMA_8B_NK, (1, 16, 128, 1024)):
    GPU_CASES[f"gpu_w4_g128_{m}x{n}x{k}"] = dict(kind="group", m=m, n=n, k=k, bits=4, group=128, zeros="codes",
                                                dtype="float16", tiles=None)
    GPU_CASES[f"gpu_w8_perchan_{m}x{n}x{k}"] = dict(kind="group", m=m, n=n, k=k, bits=8, group=-1, zeros=None,
                                                   dtype="bfloat16", tiles=None)
    GPU_CASES[f"gpu_int8_{m}x{n}x{k}"] = dict(kind="int8", m=m, n=n, k=k, per_row=True, bias=False,
                                             out_dtype="bfloat16", tiles=None)
    GPU_CASES[f"gpu_fp8_{m}x{n}x{k}"] = dict(kind="fp8_dynamic", m=m, n=n, k=k, per_channel=True, dtype="bfloat16")
GPU_CASES["gpu_w4_ragged_g128_64x1536x576"] = dict(kind="group", m=64, n=1536, k=576, bits=4, group=128, zeros="codes",
                                                  dtype="bfloat16", tiles=None)  # SmolLM2's width: 4.5 groups
GPU_CASES["gpu_fp8_dynamic_fp16_tensorwise"] = dict(kind="fp8_dynamic", m=33, n=1024, k=512, per_channel=True,
                                                    dtype="float16", bias=True)
# torch._scaled_mm with dynamic activation scales: plain torch, so these run in-process wherever torch has it.
SCALED_MM_CASES = {
    f"{m}x{n}x{k}_{'token' if per_token else 'tensor'}_{dtype}_{i}": dict(
        kind="fp8_dynamic", m=m, n=n, k=k, per_token=per_token, dtype=dtype, per_channel=i % 3 != 1, bias=i % 2 == 0)
    for i, ((m, n, k), (per_token, dtype)) in enumerate(zip(
        [(1, 48, 64), (3, 96, 160), (17, 48, 160), (5, 96, 64), (1, 96, 160), (17, 96, 64)],
        [(True, "bfloat16"), (False, "bfloat16"), (False, "float16"), (False, "float32"), (True, "bfloat16"),
         (False, "float16")]))
}
GPU_CASES["gpu_quant_int8_4096"] = dict(kind="quantize", m=300, k=4096, dtype="bfloat16")

# Relative to max |reference|: fp32 products are exact-ish, 16-bit runs round the weights and the output.
TOLERANCE = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 2e-2}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> str | None:
    tol = TOLERANCE[dtype]
    scale = ref.float().abs().max().item() or 1.0
    try:
        torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol, equal_nan=True)
    except AssertionError as exc:
        return str(exc)[:1500]
    return None


def _nan_padded(t: torch.Tensor) -> torch.Tensor:
    """t as a view into a longer buffer whose tail is NaN (floats) or 255: an out-of-bounds read that
    reaches the output shows up as NaN or a wrong value instead of passing by luck."""
    flat = torch.full((t.numel() + 4096,), float("nan") if t.is_floating_point() else 255, dtype=t.dtype,
                      device=t.device)
    flat[:t.numel()] = t.reshape(-1)
    return flat[:t.numel()].view(t.shape)


def _group_weights(case: dict, gen: torch.Generator, device: str):
    from pagellm.ops.gguf_repack import pack_int4

    n, k, bits = case["n"], case["k"], case["bits"]
    groups = 1 if case["group"] == -1 else -(-k // case["group"])  # the last group may be narrower
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    qweight = pack_int4(codes) if bits == 4 else codes
    # Scales near 1/sqrt(K) keep outputs O(1); fp16 scales as GPTQ/AWQ checkpoints store them.
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * (2.0 / (k ** 0.5 * (1 << bits)))).half()
    zeros = {None: None,
             "codes": torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8),
             "float": torch.randn(n, groups, generator=gen) * (1 << bits) / 4}[case["zeros"]]
    return [t if t is None else _nan_padded(t.to(device)) for t in (qweight, scales, zeros)]


def run_case(case: dict, device: str, seed: int = 0) -> str | None:
    """Runs one case through its kernel and its torch reference; None when they agree, else what differed."""
    from pagellm.ops import quant_reference as ref
    from pagellm.ops import triton_quant_matmul as tq

    gen = torch.Generator().manual_seed(seed)
    kind = case["kind"]
    tiles = tq.MatmulTiles(**case["tiles"]) if case.get("tiles") else None
    if kind == "group":
        qweight, scales, zeros = _group_weights(case, gen, device)
        x = torch.randn(case["m"], case["k"], generator=gen).to(getattr(torch, case["dtype"])).to(device)
        if case.get("strided"):  # rows of a wider buffer; scales / zeros stored transposed, as GPTQ keeps them
            x = torch.cat([x, torch.full_like(x[:, :5], float("nan"))], dim=1)[:, :case["k"]]
            scales = scales.t().contiguous().t()
            zeros = zeros if zeros is None else zeros.t().contiguous().t()
        out = tq.group_matmul(x, qweight, scales, zeros, case["group"], case["bits"], tiles=tiles)
        if out.dtype != x.dtype or out.shape != (case["m"], case["n"]):
            return f"group_matmul returned {out.dtype} {tuple(out.shape)}"
        expect = x.float() @ ref.dequantize_group(qweight, scales, zeros, case["group"], case["bits"]).t()
        return _close(out, expect, case["dtype"])
    if kind == "quantize":
        x = (torch.randn(case["m"], case["k"], generator=gen) * 3).to(getattr(torch, case["dtype"]))
        x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # amax 127 -> scale 1: ties that round to even
        if case["m"] > 1:
            x[1] = 0  # an all-zero row: scale 1, codes 0
        x = x.to(device)
        q, s = tq.quantize_per_token_int8(x)
        q_ref, s_ref = ref.quantize_per_token_int8_reference(x)
        if not torch.equal(s, s_ref):
            return f"scales differ: max |diff| {(s - s_ref).abs().max().item()}"
        if not torch.equal(q, q_ref):
            return f"codes differ at {int((q != q_ref).sum())} of {q.numel()} places"
        return None if q[0, :3].tolist() == [0, 2, -2] else f"ties rounded as {q[0, :3].tolist()}, want [0, 2, -2]"
    if kind == "int8":
        m, n, k = case["m"], case["n"], case["k"]
        x_q = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
        w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
        x_s = (torch.rand(m, 1, generator=gen) * 0.02).to(device) if case["per_row"] else 0.015
        w_s = (torch.rand(n, generator=gen) * 0.02).to(device) if case["per_row"] else torch.tensor(0.01, device=device)
        bias = torch.randn(n, generator=gen).to(device) if case["bias"] else None
        out_dtype = getattr(torch, case["out_dtype"])
        out = tq.int8_matmul(x_q, x_s, w_q, w_s, out_dtype, bias, tiles=tiles)
        if out.dtype != out_dtype:
            return f"int8_matmul returned {out.dtype}, asked for {out_dtype}"
        return _close(out, ref.int8_matmul_reference(x_q, x_s, w_q, w_s, torch.float32, bias), case["out_dtype"])
    if kind in ("fp8", "fp8_dynamic"):
        m, n, k = case["m"], case["n"], case["k"]
        dtype = getattr(torch, case["dtype"])
        w = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn).to(device)
        w_s = (torch.rand(n, generator=gen) * 0.01 / k ** 0.5).to(device) if case["per_channel"] else 0.002
        bias = torch.randn(n, generator=gen).to(dtype).to(device) if case.get("bias") else None
        x = torch.randn(m, k, generator=gen).to(dtype).to(device)
        if kind == "fp8":
            out = tq.fp8_weight_only_matmul(x, w, w_s, bias, tiles=tiles)
            via_linear = tq.fp8_linear(x, w, w_s, bias) if device == "cpu" else out  # the CPU takes the fallback
            if not torch.equal(out, via_linear) and tiles is None:
                return "fp8_linear did not take the Triton fallback on the CPU"
            return _close(out, ref.fp8_weight_only_reference(x, w, w_s, bias), case["dtype"])
        if "per_token" in case:
            per_token = case["per_token"]
            out = tq.fp8_scaled_mm_linear(x, w, w_s, bias, per_token=per_token)
        else:  # fp8_linear picks the mode from the GPU and torch build
            mode = tq.scaled_mm_support(torch.cuda.current_device())
            if mode == "none":
                return None if torch.equal(tq.fp8_linear(x, w, w_s, bias), tq.fp8_weight_only_matmul(
                    x, w, w_s, bias)) else "without _scaled_mm, fp8_linear should be the Triton fallback"
            per_token = mode == "rowwise" and dtype == torch.bfloat16
            out = tq.fp8_linear(x, w, w_s, bias)
        if out.dtype != dtype:
            return f"fp8 linear returned {out.dtype}, want {dtype}"
        # Same fp8 activations as the reference: only summation order and output rounding differ.
        return _close(out, ref.fp8_dynamic_reference(x, w, w_s, bias, torch.float32, per_token), case["dtype"])
    if kind == "fp8_codes":
        w = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
        x = torch.eye(16).to(device)  # out[i, n] = w[n, i]: every code decoded (NaN codes give NaN columns)
        out = tq.fp8_weight_only_matmul(x, w.to(device), 1.0)
        expect = x.float() @ w.float().t().to(device)
        return None if torch.equal(out.isnan(), expect.isnan()) and torch.equal(
            out.nan_to_num(), expect.nan_to_num()) else "fp8 decode differs from torch's float8_e4m3fn -> float32"
    if kind == "gguf":
        return _gguf_matmul_case(case, gen, device)
    if kind == "gguf_method":
        return _gguf_method_case(case, gen, device)
    if kind == "int_group_seam":
        return _int_group_seam_case(case, gen, device)
    return f"unknown case kind {kind}"


def _gguf_blocks(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks (n, bytes) uint8, gguf's dequantized (n, k) fp32) for random weights with some special blocks."""
    from gguf import GGMLQuantizationType, quants

    qtype = getattr(GGMLQuantizationType, fmt.upper())
    w = torch.randn(n, k, generator=gen).numpy()
    w[0, :32] = 0.75  # a constant block: Q4_1 writes d = 0, m = 0.75
    raw = quants.quantize(w, qtype)
    if fmt == "q4_1":
        raw[1, 0:2] = 0  # d = 0 with non-zero codes: every value is m
    return raw, quants.dequantize(raw, qtype)


def _gguf_matmul_case(case: dict, gen: torch.Generator, device: str) -> str | None:
    from pagellm.ops import triton_quant_matmul as tq

    from gguf import GGMLQuantizationType

    raw, dense = _gguf_blocks(case["fmt"], case["n"], case["k"], gen)
    *weights, bits = tq.repack_gguf(torch.from_numpy(raw), int(getattr(GGMLQuantizationType, case["fmt"].upper())))
    qweight, scales, zeros = (t if t is None else t.to(device) for t in weights)
    x = torch.randn(case["m"], case["k"], generator=gen).to(device)
    out = tq.group_matmul(x, qweight, scales, zeros, 32, bits)
    return _close(out, x @ torch.from_numpy(dense).to(device).t(), "float32")


def _gguf_method_case(case: dict, gen: torch.Generator, device: str) -> str | None:
    """GGUFLinearMethod's GPU path: a fused layer of one type repacked for the group GEMM, or a merged
    layer of mixed types as dense parts (called directly, so the interpreter runs it on CPU tensors)."""
    from gguf import GGMLQuantizationType

    from pagellm.layers.linear import Linear, MergedLinear
    from pagellm.layers.quantization.gguf import GGUFQuantizedTensor
    from pagellm.ops.gguf_cpu import load_gguf_ops

    assert load_gguf_ops()  # the loader builds them before any GGUF weight exists
    fmts, k = case["fmts"], case["k"]
    sizes = {f"s{i}": n for i, n in enumerate(case["n"])}
    layer = Linear(k, sizes["s0"]) if len(fmts) == 1 else MergedLinear(k, sizes)
    dense = []
    for (name, n), fmt in zip(sizes.items(), fmts):
        raw, w = _gguf_blocks(fmt, n, k, gen)
        tensor = GGUFQuantizedTensor(torch.from_numpy(raw), getattr(GGMLQuantizationType, fmt.upper()),
                                     torch.Size((n, k)))
        layer.load("weight", tensor) if len(fmts) == 1 else layer.load_shard(name, "weight", tensor)
        dense.append(torch.from_numpy(w))
    layer.to(device)
    layer.method.use_group_kernel(layer) if len(fmts) == 1 else None
    if len(fmts) == 1 and (layer.qweight is not None or layer.group_qweight is None):
        return "the fused weight was not repacked for the group GEMM"
    x = torch.randn(case["m"], k, generator=gen).to(device)
    out = layer.method._apply_gpu(layer, x, skip_bias=False)
    return _close(out, x @ torch.cat(dense).to(device).t(), "float32")


def _int_group_seam_case(case: dict, gen: torch.Generator, device: str) -> str | None:
    """GPTQ/AWQ's GPU entry point (`int_group._cuda_linear`) on the group GEMM: act order and zero points."""
    from pagellm.layers.quantization.int_group import GroupQuantizedWeight, _cuda_linear

    n, k, g = case["n"], case["k"], case["group"]
    qweight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) / 10).half()
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    weight = GroupQuantizedWeight(4, qweight, scales, zeros, g, k, torch.randperm(k, generator=gen))
    x = torch.randn(case["m"], k, generator=gen)
    ref = x @ weight.dequantize().t()
    for name in ("qweight", "scales", "zeros", "perm"):
        setattr(weight, name, getattr(weight, name).to(device))
    return _close(_cuda_linear(x.to(device), weight), ref.to(device), "float32")


def _interpreter_worker() -> int:
    import triton.runtime.interpreter as interpreter

    from pagellm.ops.triton_quant_matmul import _group_matmul_kernel

    results: dict[str, str | None] = {"interpreter_active": None}
    if not isinstance(_group_matmul_kernel, interpreter.InterpretedFunction):
        results["interpreter_active"] = "the kernels were compiled, not interpreted: TRITON_INTERPRET was not honoured"
    for name, case in CPU_CASES.items():
        try:
            results[name] = run_case(case, "cpu")
        except Exception as exc:  # one broken case must not hide the others' verdicts
            results[name] = f"{type(exc).__name__}: {exc}"[:1500]
    print(json.dumps(results))
    return 0


def _scaled_mm_on_cpu() -> bool:
    try:
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.float32)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _scaled_mm_on_cpu(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("name", SCALED_MM_CASES)
def test_fp8_scaled_mm_matches_reference(name):
    assert run_case(SCALED_MM_CASES[name], "cpu") is None


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_gguf_repack_matches_gguf_dequantize(fmt):
    from pagellm.ops import triton_quant_matmul as tq
    from pagellm.ops.quant_reference import dequantize_group

    raw, dense = _gguf_blocks(fmt, 8, 96, torch.Generator().manual_seed(1))
    repack = {"q4_0": tq.repack_gguf_q4_0, "q4_1": tq.repack_gguf_q4_1, "q8_0": tq.repack_gguf_q8_0}[fmt]
    qweight, scales, zeros = repack(torch.from_numpy(raw))
    assert qweight.shape == ((8, 48) if fmt != "q8_0" else (8, 96)) and scales.shape == (8, 3)
    assert (zeros is None) == (fmt != "q4_1")
    got = dequantize_group(qweight, scales, zeros, 32, 8 if fmt == "q8_0" else 4)
    expect = torch.from_numpy(dense)
    if fmt == "q4_1":  # -m/d as a zero rounds once more than d * q + m
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6 * expect.abs().max().item())
        assert torch.equal(got[:2, :32], expect[:2, :32])  # the d == 0 blocks come out as m exactly
    else:
        assert torch.equal(got, expect)


def test_bad_arguments_raise_value_errors(monkeypatch):
    from pagellm.ops import triton_quant_matmul as tq

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 64)
    qweight = torch.zeros(8, 32, dtype=torch.uint8)
    scales = torch.ones(8, 2)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        tq.group_matmul(x, qweight, scales, None, 32, 3)
    with pytest.raises(ValueError, match="K=64"):
        tq.group_matmul(x, qweight, scales, None, 32, 8)
    with pytest.raises(ValueError, match="group_size must be -1"):
        tq.group_matmul(x, qweight, scales, None, 0, 4)
    with pytest.raises(ValueError, match="scales must be"):
        tq.group_matmul(x, qweight, torch.ones(8, 3), None, 32, 4)
    with pytest.raises(ValueError, match="zeros must be"):
        tq.group_matmul(x, qweight, scales, torch.ones(8, 2, dtype=torch.int32), 32, 4)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        tq.group_matmul(x, qweight, scales, None, 32, 4)
    with pytest.raises(ValueError, match="w_scale must be"):
        tq.fp8_linear(x, torch.zeros(8, 64).to(torch.float8_e4m3fn), torch.ones(3))
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        tq.fp8_linear(x, torch.zeros(8, 64).to(torch.float8_e4m3fn), 1.0)
    with pytest.raises(ValueError, match="x_q and w_q must be 2-D int8"):
        tq.int8_matmul(x, 1.0, torch.zeros(8, 64, dtype=torch.int8), 1.0, torch.float32)
    with pytest.raises(ValueError, match="ggml type 12 has no group-GEMM layout"):
        tq.repack_gguf(torch.zeros(4, 144, dtype=torch.uint8), 12)  # Q4_K
    with pytest.raises(ValueError, match="row bytes"):
        tq.repack_gguf_q4_0(torch.zeros(4, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="MatmulTiles.block_k"):
        tq.MatmulTiles(16, 16, 24)


def test_tile_heuristic():
    from pagellm.ops.triton_matmul_common import choose_tiles

    decode = choose_tiles(1, 4096, 4096, 128, sms=132)
    assert (decode.block_m, decode.block_k) == (16, 128) and decode.split_k > 1  # 64 N tiles for 132 SMs
    assert choose_tiles(1, 4096, 4096, 32, sms=132).block_k == 32  # a K step never spans two groups
    prefill = choose_tiles(1024, 4096, 4096, 128, sms=132)
    assert (prefill.block_m, prefill.block_n, prefill.split_k, prefill.num_warps) == (128, 128, 1, 8)
    assert choose_tiles(1, 28672, 4096, 128, sms=132).split_k == 1  # 448 N tiles fill the GPU already
    assert choose_tiles(1, 4096, 64, 32, sms=132).split_k == 1  # too few K steps to split


def _ptxas_report(kernel, types: dict, constants: dict, arch: int, num_warps: int, num_stages: int) -> str:
    """Compiles one launch's kernel for sm_<arch> without a GPU (Triton's bundled ptxas) -> ptxas -v output.

    Arguments get the JIT's usual specialization: unit strides become constants, pointers, strides
    and N (multiples of 16 in real shapes) carry the divisibility hint; M does not.
    """
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = dict(constants)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in ("stride_xk", "stride_on"):
            constants[name] = 1
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if name != "M":
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Used \d+ registers", proc.stderr), proc.stderr[-2000:]
    return proc.stderr


# (arch, x dtype, bits or "fp8", zeros, group, M, N, K): what Llama-8B launches look like, H100 and A100.
COMPILE_CASES = [
    (90, torch.float16, 4, "codes", 128, 1, 4096, 4096),  # decode: split-K, fp32 partials
    (90, torch.bfloat16, 4, "float", 32, 1024, 4096, 4096),  # prefill: 128 x 128 tiles, float zeros
    (90, torch.bfloat16, 4, None, 48, 64, 4096, 4096),  # a group that is not a power of two: per-weight scales
    (90, torch.bfloat16, 8, None, -1, 128, 4096, 14336),  # W8A16 per channel
    (90, torch.float32, 4, "codes", 128, 17, 4096, 4096),  # fp32 activations (FMA dots)
    (80, torch.float16, "fp8", None, -1, 1, 4096, 4096),  # the fp8 fallback's GPU: no fp8 type on sm80
    (80, torch.bfloat16, "fp8", None, -1, 1024, 4096, 4096),
]
_TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _nvidia_backend() -> bool:
    try:
        import triton

        return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except ImportError:
        return False


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton's NVIDIA backend (ptxas)")
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: f"sm{c[0]}_{c[2]}_z{c[3]}_g{c[4]}_m{c[5]}_{c[1]}".replace(
    "torch.", ""))
def test_group_kernel_compiles_without_spills(case, monkeypatch):
    """Compiled (not interpreted) kernels: lowering for H100 and A100 works and ptxas spills no registers."""
    from pagellm.ops import triton_quant_matmul as tq
    from pagellm.ops.triton_matmul_common import choose_tiles

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    arch, dtype, bits, zeros, group, m, n, k = case
    g = k if group == -1 else group
    tiles = choose_tiles(m, n, k, g, 132 if arch == 90 else 108, fp32_inputs=dtype == torch.float32)
    weight = {4: tq._INT4, 8: tq._UINT8, "fp8": tq._FP8}[bits]
    zero_mode = {None: tq._ZERO_CONST, "codes": tq._ZERO_CODES, "float": tq._ZERO_FLOAT}[zeros]
    constants = tq.group_kernel_constants(k, g, weight, zero_mode, 8 if bits == 4 else 128, bits == "fp8", dtype,
                                          tiles, interpreter=False)
    out = "*fp32" if tiles.split_k > 1 else _TRITON_TYPES[dtype]
    types = dict(x_ptr=_TRITON_TYPES[dtype], w_ptr="*u8", s_ptr="*fp16" if bits != "fp8" else "*fp32",
                 z_ptr="*fp32" if zeros == "float" else "*u8", bias_ptr=_TRITON_TYPES[dtype], out_ptr=out)
    report = _ptxas_report(tq._group_matmul_kernel, types, constants, arch, tiles.num_warps, tiles.num_stages)
    assert " 0 bytes spill stores" in report, report[-1500:]


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton's NVIDIA backend (ptxas)")
@pytest.mark.parametrize("m", [1, 1024])
def test_int8_kernels_compile_without_spills(m, monkeypatch):
    from pagellm.ops import triton_int8_matmul as t8
    from pagellm.ops.triton_matmul_common import choose_tiles

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiles = choose_tiles(m, 4096, 4096, 4096, 132, block_k=128)
    types = dict(x_ptr="*i8", w_ptr="*i8", xs_ptr="*fp32", ws_ptr="*fp32", bias_ptr="*bf16",
                 out_ptr="*fp32" if tiles.split_k > 1 else "*bf16")
    report = _ptxas_report(t8._int8_matmul_kernel, types, t8.int8_kernel_constants(4096, True, True, m > 1, tiles),
                           90, tiles.num_warps, tiles.num_stages)
    assert " 0 bytes spill stores" in report, report[-1500:]
    if m == 1:
        quant = _ptxas_report(t8._quantize_rows_kernel, dict(x_ptr="*bf16", q_ptr="*i8", scale_ptr="*fp32"),
                              dict(K=4096, BLOCK=2048, N_TILES=2), 90, num_warps=8, num_stages=1)
        assert " 0 bytes spill stores" in quant, quant[-1500:]


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    """Without a GPU the interpreter run starts when collection ends (conftest), beside the suite."""
    from conftest import early_subprocess_result

    returncode, stdout, stderr = early_subprocess_result(os.path.basename(__file__), timeout=300)
    assert returncode == 0, f"interpreter run failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["interpreter_active", *CPU_CASES])
def test_interpreter_matches_torch(name, interpreter_results):
    assert name in interpreter_results, f"the interpreter run did not report {name}"
    assert interpreter_results[name] is None, interpreter_results[name]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", [*CPU_CASES, *SCALED_MM_CASES, *GPU_CASES])
def test_gpu_matches_torch(name):
    case = CPU_CASES.get(name) or SCALED_MM_CASES.get(name) or GPU_CASES[name]
    assert run_case(case, "cuda") is None


if __name__ == "__main__":
    sys.exit(_interpreter_worker())
