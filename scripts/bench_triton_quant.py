"""GPU micro-benchmark of the Triton quantized matmuls at Llama-3.1-8B projection shapes.

    python scripts/bench_triton_quant.py [--m 1 16 128 1024] [--group 128] [--extra] [--json out.json]

Per (M, N, K): W4A16 `group_matmul` (4-bit codes, group 128, uint8 zeros, fp16 activations) against
fp16 `F.linear` on the dense weight and against dequantize-then-`F.linear` (what running a 4-bit
checkpoint without the kernel costs). `--extra` adds W8A8 `int8_matmul` (activation quantization
included) and `fp8_linear`. Prints microseconds, TFLOP/s (2MNK / time) and, for the weight-only
kernels, the weight-read bandwidth; each kernel's output is checked against the fp16 reference first.

`--device cpu` under TRITON_INTERPRET=1 runs the same code at one tiny shape, a dry run of the
plumbing; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# (name, N, K) of Llama-3.1-8B's linears: fused q/k/v, o, fused gate/up, down.
LLAMA_8B = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
DRY_RUN = [("tiny", 96, 256)]


def median_seconds(fn, min_run_time: float = 0.3) -> float:
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def bench_shape(m: int, n: int, k: int, group: int, extra: bool, dev: torch.device) -> dict:
    from pagellm.ops.gguf_repack import pack_int4
    from pagellm.ops.quant_reference import dequantize_group
    from pagellm.ops.triton_quant_matmul import fp8_linear, group_matmul, int8_matmul, quantize_per_token_int8

    gen = torch.Generator(device=dev).manual_seed(0)
    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8, generator=gen)
    qweight = pack_int4(codes)
    scales = (torch.rand(n, k // group, device=dev, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (n, k // group), device=dev, dtype=torch.uint8, generator=gen)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.float16 if dev.type == "cuda" else torch.float32)
    dense = dequantize_group(qweight, scales, zeros, group, 4).to(x.dtype)
    flops = 2.0 * m * n * k
    ref = F.linear(x, dense).float()

    def check(name: str, out: torch.Tensor, tol: float) -> None:
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        if err > tol:
            raise SystemExit(f"{name} at M={m} N={n} K={k}: relative error {err:.3g} > {tol}")

    check("group_matmul", group_matmul(x, qweight, scales, zeros, group, 4), 1e-2)
    runs = {
        "w4a16_triton": (lambda: group_matmul(x, qweight, scales, zeros, group, 4), qweight.numel()),
        "fp16_linear": (lambda: F.linear(x, dense), dense.numel() * 2),
        "dequant_then_linear": (lambda: F.linear(x, dequantize_group(qweight, scales, zeros, group, 4).to(x.dtype)),
                                qweight.numel()),
    }
    if extra:
        w_q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
        w_s = torch.rand(n, device=dev, generator=gen) * 0.01
        w_fp8 = dense.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)

        def w8a8() -> torch.Tensor:
            x_q, x_s = quantize_per_token_int8(x)
            return int8_matmul(x_q, x_s, w_q, w_s, x.dtype)

        check("fp8_linear", fp8_linear(x, w_fp8, one), 8e-2)
        runs["w8a8_triton"] = (w8a8, w_q.numel())
        runs["fp8_linear"] = (lambda: fp8_linear(x, w_fp8, one), w_fp8.numel())
    row = {"m": m, "n": n, "k": k}
    for name, (fn, weight_bytes) in runs.items():
        fn()
        seconds = median_seconds(fn)
        row[name] = {"us": seconds * 1e6, "tflops": flops / seconds / 1e12, "weight_gbps": weight_bytes / seconds / 1e9}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 1024])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--extra", action="store_true", help="also W8A8 int8_matmul and fp8_linear")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run under TRITON_INTERPRET=1 at one tiny shape")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_triton_quant.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu dry run'}  torch {torch.__version__}")
    rows = []
    for m in args.m:
        for name, n, k in LLAMA_8B if dev.type == "cuda" else DRY_RUN:
            row = bench_shape(m, n, k, args.group, args.extra, dev)
            row["layer"] = name
            rows.append(row)
            cells = "  ".join(f"{key} {v['us']:8.1f} us {v['tflops']:6.1f} TF/s {v['weight_gbps']:6.0f} GB/s"
                              for key, v in row.items() if isinstance(v, dict))
            print(f"M={m:<5d} {name:<8s} N={n:<6d} K={k:<6d} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
