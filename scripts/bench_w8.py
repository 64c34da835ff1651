"""Micro-benchmark of the 8-bit weight CPU kernels against torch's own ops (<= 60 s).

For M (activation rows) in {1, 8, 64}, N in {576, 1536, 49152}, K = 576, prints microseconds per
call of: dense fp32 F.linear; W8A16 int8 (ours, torch._weight_int8pack_mm); W8A16 FP8 (ours);
W8A8 int8 with dynamic per-token activations (ours; torch._int_mm after quantizing x in torch);
W8A8 with a static per-tensor activation scale through oneDNN (torch.ops.onednn.qlinear_pointwise,
when present); and the ratios of ours to the best torch op for the same arithmetic.

    python scripts/bench_w8.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pagellm.ops import w8_cpu

K = 576


def per_call_us(fn, budget_s: float = 0.25) -> float:
    fn()
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best * 1e6


def torch_w8a8_dynamic(x, w_t, s):
    amax = x.abs().amax(-1, keepdim=True)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(x / sx).clamp(-128, 127).to(torch.int8)
    return torch._int_mm(q, w_t).float() * sx * s


def onednn_static(K: int, w: torch.Tensor, s: torch.Tensor, M: int):
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_prepack"):
        return None
    try:
        packed = ops.qlinear_prepack(w, [M, K])
        zp = torch.zeros(w.shape[0], dtype=torch.int64)

        def run(x):
            qx = torch.round(x / 0.05).clamp(0, 255).to(torch.uint8)  # u8 activations, zero point 0
            return ops.qlinear_pointwise(qx, 0.05, 0, packed, s, zp, None, 1.0, 0, torch.float32, "none", [], "")
        return run
    except Exception as exc:  # an op that this build or CPU lacks
        print(f"  (oneDNN qlinear unavailable: {type(exc).__name__})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert w8_cpu.load_w8_ops(), "the 8-bit weight kernels failed to build"
    print(f"isa {w8_cpu.active_isa()} (vnni {w8_cpu.has_vnni()}), threads {torch.get_num_threads()}, K={K}")
    torch.manual_seed(0)
    head = (f"{'M':>3} {'N':>6} | {'fp32':>8} | {'w8a16':>8} {'int8pk':>8} {'ratio':>5} | {'fp8':>8} | "
            f"{'w8a8':>8} {'int_mm':>8} {'ratio':>5} | {'onednn':>8}")
    print(head)
    for N in (576, 1536, 49152):
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        w_t = w.t().contiguous().t()  # _int_mm wants (K, N); a transposed view of the row-major codes
        s = torch.rand(N) + 0.5
        s2 = s[:, None].contiguous()
        wsum = w.sum(1, dtype=torch.int32)
        wf = (torch.randn(N, K) * 8).to(torch.float8_e4m3fn)
        dense = w.float() * s2
        budget = 0.15 if N < 49152 else 0.6
        for M in (1, 8, 64):
            x = torch.randn(M, K)
            fp32 = per_call_us(lambda: F.linear(x, dense), budget)
            ours16 = per_call_us(lambda: w8_cpu.w8a16_linear(x, w, s2, K), budget)
            pk = per_call_us(lambda: torch._weight_int8pack_mm(x, w, s), budget)
            fp8 = per_call_us(lambda: w8_cpu.w8a16_linear(x, wf, s2, K), budget)
            ours8 = per_call_us(lambda: w8_cpu.w8a8_linear(x, w, s, wsum, False), budget)
            try:
                intmm = per_call_us(lambda: torch_w8a8_dynamic(x, w.t(), s), budget)
            except RuntimeError:
                intmm = float("nan")
            run = onednn_static(K, w, s, M)
            dnn = per_call_us(lambda: run(x), budget) if run is not None else float("nan")
            print(f"{M:>3} {N:>6} | {fp32:8.1f} | {ours16:8.1f} {pk:8.1f} {ours16 / pk:5.2f} | {fp8:8.1f} | "
                  f"{ours8:8.1f} {intmm:8.1f} {ours8 / intmm:5.2f} | {dnn:8.1f}")
    print("ratio: ours / torch's op for the same arithmetic (< 1: ours is faster)")


if __name__ == "__main__":
    main()
