"""Microseconds per call of the C++ CPU kernels (pagellm/ops/csrc/cpu_ops.cpp) on every ISA path
this CPU has, at SmolLM2-135M's shapes (9 q heads, 3 kv heads, head_dim 64, block 16, hidden 576,
intermediate 1536), float32. About 30 s.

    python scripts/bench_cpu_kernels.py            # the kernels, each path forced via PAGELLM_CPU_ISA
    python scripts/bench_cpu_kernels.py --e2e      # also `pagellm bench latency` at batch 1, per path

PAGELLM_CPU_ISA also steers the GGUF matmul kernels, so the --e2e rows move both: they show what
a CPU without AVX2 (scalar) or without AVX-512 (avx2) gets, not the share of these kernels alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from pagellm.ops import cpu as cpu_ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
HIDDEN, INTERMEDIATE = 576, 1536


def time_call(fn, min_seconds: float = 0.3) -> float:
    """Fastest of 5 timed runs of enough calls to fill min_seconds / 5, in microseconds per call
    (the minimum: on a shared machine the slower runs measure the neighbours)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.02:
        fn()
        calls += 1
    per_run = max(1, int(calls * min_seconds / 5 / 0.02))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_run):
            fn()
        samples.append((time.perf_counter() - start) / per_run * 1e6)
    return min(samples)


def decode_case(batch: int, context: int):
    gen = torch.Generator().manual_seed(batch * 10000 + context)
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq + 1
    k_cache, v_cache = (torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    tables = tables.to(torch.int32).contiguous()
    lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    out = torch.empty_like(q)
    return lambda: torch.ops.pagellm_cpu.paged_decode_attention(out, q, k_cache, v_cache, tables, lens,
                                                                HEAD_DIM ** -0.5, 0, 0.0)


def norm_case(rows: int):
    x, residual, weight = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN), torch.randn(HIDDEN)
    out = torch.empty_like(x)
    return lambda: torch.ops.pagellm_cpu.fused_add_rms_norm(out, x, residual, weight, 1e-5)


def silu_case(rows: int):
    x = torch.randn(rows, 2 * INTERMEDIATE)
    out = torch.empty(rows, INTERMEDIATE)
    return lambda: torch.ops.pagellm_cpu.silu_and_mul(out, x)


CASES = {
    **{f"decode attention  batch {b:>2}, context {c:>4}": (decode_case, (b, c)) for b in (1, 16) for c in (128, 1024)},
    **{f"add + RMSNorm {HIDDEN}   rows {r:>2}": (norm_case, (r,)) for r in (1, 16)},
    **{f"SiLU-and-mul {INTERMEDIATE}   rows {r:>2}": (silu_case, (r,)) for r in (1, 16)},
}


def bench_kernels(isas: list[str]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, (make, args) in CASES.items():
        fn = make(*args)
        results[name] = {}
        for isa in isas:
            os.environ[cpu_ops.ISA_ENV] = isa
            results[name][isa] = time_call(fn)
        os.environ.pop(cpu_ops.ISA_ENV)
    return results


def bench_latency(isa: str | None, threads: int) -> str:
    """The summary line of `pagellm bench latency --batch-size 1 --input-len 128 --output-len 32`."""
    env = dict(os.environ)
    env.pop(cpu_ops.ISA_ENV, None)
    if isa is not None:
        env[cpu_ops.ISA_ENV] = isa
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "bench", "latency", "--batch-size", "1",
           "--input-len", "128", "--output-len", "32", "--num-iters-warmup", "1", "--num-iters", "3",
           "--disable-tqdm", "--torch-threads", str(threads)]
    with tempfile.TemporaryDirectory() as result_dir:
        done = subprocess.run([*cmd, "--result-dir", result_dir], env=env, check=True, capture_output=True, text=True)
    return next(line for line in done.stdout.splitlines() if "e2e median" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e", action="store_true", help="also time `pagellm bench latency` per ISA path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every timing (default 1: steadier on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert cpu_ops.load_cpu_ops(), "the C++ CPU kernels failed to build"
    isas = cpu_ops.supported_isas()
    print(f"torch threads {torch.get_num_threads()}; paths {', '.join(isas)} (default {cpu_ops.active_isa()})")
    print(f"{'us per call':<42}" + "".join(f"{isa:>10}" for isa in isas) + "   scalar/best")
    for name, row in bench_kernels(isas).items():
        best = min(row.values())
        print(f"{name:<42}" + "".join(f"{row[isa]:>10.1f}" for isa in isas) + f"{row['scalar'] / best:>12.1f}x")
    if args.e2e:
        for isa in ["scalar", *isas[1:-1], None]:
            print(f"{cpu_ops.ISA_ENV}={isa or 'auto':<7} {bench_latency(isa, args.threads)}", flush=True)


if __name__ == "__main__":
    main()
