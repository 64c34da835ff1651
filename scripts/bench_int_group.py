"""µs per call of a group-quantized (GPTQ/AWQ-style) linear layer on the CPU, K=576 (SmolLM2-135M's
hidden size), N in {576, 1536}, M in {1, 8, 64}, G in {32, 128}:

- ours: the weight repacked into GGUF Q4_0 blocks, the GGUF C++ kernel (plus, asymmetric, the
  per-group zero-point correction addmm) — pagellm/ops/int_group_cpu.py
- dense: F.linear on the dequantized float32 weight (4x the bytes)
- int4pack bf16 / fp32: torch._weight_int4pack_mm_for_cpu (bfloat16 scales/zeros: not exact for
  float16 scales)
- dequant/call: expand the weight every call, then F.linear

Run: python scripts/bench_int_group.py [threads]   (one thread by default: steady numbers on a shared
machine; about 30-60 s)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pagellm.layers.quantization.int_group import GroupQuantizedWeight, group_count, pack_codes
from pagellm.ops.int_group_cpu import CpuGroupWeight

K = 576


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(samples)


def int4pack(codes: torch.Tensor, weight: GroupQuantizedWeight, dtype: torch.dtype):
    """torch's int4 CPU kernel: w = (q - 8) * scale + zero, zero a float per group (nan: not run)."""
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scales = weight.scales.float()
    zeros = (8 - weight.zeros.float()) * scales if weight.zeros is not None else torch.zeros_like(scales)
    scale_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(dtype).contiguous()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, weight.group_size, scale_zeros)


def int4pack_or_none(codes: torch.Tensor, weight: GroupQuantizedWeight, dtype: torch.dtype):
    """None where torch's kernel refuses the shape (a group size that does not divide K) or dtype."""
    try:
        fn = int4pack(codes, weight, dtype)
        fn(torch.randn(1, K, dtype=dtype))
        return fn
    except RuntimeError:
        return None


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per call (median of 5)")
    header = f"{'M':>3} {'N':>5} {'G':>4} {'ours sym':>9} {'ours asym':>9} {'dense':>9} {'i4p bf16':>9} {'i4p fp32':>9} {'deq/call':>9}"
    print(header)
    for g in (32, 128):
        for n in (576, 1536):
            codes = torch.randint(0, 16, (n, K))
            groups = group_count(K, g)  # G=128: four groups of 128 and one of 64
            scales = (torch.rand(n, groups) * 0.02 + 0.001).half()
            zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8)
            sym = GroupQuantizedWeight(4, pack_codes(codes, 4), scales, None, g, K)
            asym = GroupQuantizedWeight(4, pack_codes(codes, 4), scales, zeros, g, K)
            ours_sym, ours_asym = CpuGroupWeight.from_weight(sym), CpuGroupWeight.from_weight(asym)
            dense_w = asym.dequantize()
            i4_bf16, i4_fp32 = int4pack_or_none(codes, asym, torch.bfloat16), int4pack_or_none(codes, asym, torch.float32)
            for m in (1, 8, 64):
                x = torch.randn(m, K)
                xb = x.bfloat16()
                reps = 100 if m < 64 else 20
                cols = [timed(lambda: ours_sym.linear(x), reps), timed(lambda: ours_asym.linear(x), reps),
                        timed(lambda: F.linear(x, dense_w), reps),
                        timed(lambda: i4_bf16(xb), reps) if i4_bf16 is not None else float("nan"),
                        timed(lambda: i4_fp32(x), max(reps // 10, 3)) if i4_fp32 is not None else float("nan"),
                        timed(lambda: F.linear(x, asym.dequantize_stored()), 3)]
                print(f"{m:>3} {n:>5} {g:>4} " + " ".join(f"{c:>9.1f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
