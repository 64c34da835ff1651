"""The measurements of scripts/gpu_check.sh that no `pagellm bench` command makes, one subcommand each.

    python scripts/gpu_check_steps.py env       --json env.json
    python scripts/gpu_check_steps.py kernel    --json kernel.json [--batch 64 --context 2048]
    python scripts/gpu_check_steps.py memory    --json memory.json --model configs/llama-3.1-8b
    python scripts/gpu_check_steps.py coldstart --json coldstart.json -- SERVE ARGS...

Every subcommand writes one JSON with `ok` (the step's verdict) and its numbers, and exits 0 only when
`ok` is true. `--device cpu` (with small shapes) runs the same code on the CPU, for a dry run of the
plumbing; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

GiB = float(1 << 30)


def median_seconds(fn, min_run_time: float = 0.5) -> float:
    """torch's benchmark timer (it synchronizes CUDA around the timed loop)."""
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def cmd_env(args: argparse.Namespace) -> dict:
    import triton
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, total_gib=round(props.total_memory / GiB, 2), sms=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    env["ok"] = env["cuda_available"] or args.device == "cpu"
    return env


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes moved per second by a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src))


def matmul_flops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / median_seconds(lambda: a @ b)


def paged_decode_inputs(batch: int, context: int, hq: int, hkv: int, d: int, block_size: int,
                        dtype: torch.dtype, device: str):
    """One query token per request over `context` cached tokens in randomly placed blocks."""
    per_seq = -(-context // block_size)
    tables = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
    q = torch.randn(batch, hq, d, dtype=dtype, device=device)
    cache = torch.randn(2, batch * per_seq, block_size, hkv, d, dtype=dtype, device=device)
    query_start = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, cache, query_start, seq_lens, tables


def decode_attention_bytes_per_s(batch: int, context: int, device: str, hq: int = 32, hkv: int = 8, d: int = 128,
                                 block_size: int = 16) -> tuple[float, float]:
    """(KV bytes read per second, seconds per call) of the Triton decode kernel, Llama-3.1-8B heads, bf16."""
    from pagellm.attention.triton_unified_attention import unified_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, cache, query_start, seq_lens, tables = paged_decode_inputs(batch, context, hq, hkv, d, block_size, dtype,
                                                                  device)
    out = torch.empty_like(q)
    seconds = median_seconds(lambda: unified_attention(q, cache[0], cache[1], out, query_start, seq_lens, tables, 1,
                                                       context, d ** -0.5), min_run_time=0.5 if device == "cuda" else 0)
    kv_bytes = 2 * batch * context * hkv * d * cache.element_size()
    return kv_bytes / seconds, seconds


def cmd_kernel(args: argparse.Namespace) -> dict:
    """Copy bandwidth and dense bf16 matmul rate (the machine's two roofs), then the decode kernel against the first."""
    small = args.device == "cpu"
    copy = copy_bandwidth(args.device, (16 << 20) if small else (4 << 30))
    flops = matmul_flops(args.device, 256 if small else 8192, torch.float32 if small else torch.bfloat16)
    rate, seconds = decode_attention_bytes_per_s(args.batch, args.context, args.device)
    return {"ok": True, "copy_gb_per_s": copy / 1e9, "matmul_tflops": flops / 1e12, "batch": args.batch,
            "context": args.context, "decode_attention_ms": seconds * 1e3, "decode_attention_gb_per_s": rate / 1e9,
            "fraction_of_copy_bandwidth": rate / copy}


def kv_pool_bytes(model: torch.nn.Module) -> int:
    """Bytes of every attention layer's KV cache tensor (the pool the profile sized)."""
    caches = [m.kv_cache for m in model.modules() if isinstance(getattr(m, "kv_cache", None), torch.Tensor)]
    return sum(c.numel() * c.element_size() for c in caches)


def cmd_memory(args: argparse.Namespace) -> dict:
    """Starts an engine, runs a batch that fills max_num_batched_tokens, and compares the KV pool with
    utilization x total - (everything else at the measured peak)."""
    from pagellm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, quiet=True)
    prompts = [{"prompt_token_ids": [(i * 31 + j) % 30000 + 10 for j in range(args.input_len)]}
               for i in range(args.num_prompts)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    runner = llm.llm_engine.core.runner
    kv = kv_pool_bytes(runner.model)
    free, total = torch.cuda.mem_get_info()
    outside_torch = (total - free) - torch.cuda.memory_reserved()  # CUDA context, cuBLAS/NCCL handles
    peak = torch.cuda.max_memory_reserved() + outside_torch
    expected = args.gpu_memory_utilization * total - (peak - kv)
    profile = runner.memory_profile
    result = {"gpu_memory_utilization": args.gpu_memory_utilization, "total_gib": total / GiB,
              "kv_pool_gib": kv / GiB, "measured_peak_gib": peak / GiB, "measured_peak_without_kv_gib": (peak - kv) / GiB,
              "expected_kv_pool_gib": expected / GiB, "kv_over_expected": kv / expected,
              "profile": profile.describe() if profile is not None else None}
    result["ok"] = abs(result["kv_over_expected"] - 1) <= 0.05
    return result


def cmd_coldstart(args: argparse.Namespace) -> dict:
    """`pagellm serve` from launch to healthy, and to the first token of one completion."""
    import httpx

    from pagellm.benchmarks.server_process import ServerProcess

    server = ServerProcess(args.serve_args)
    start = time.monotonic()
    try:
        server.launch().wait_ready(timeout=args.timeout)
        ready = time.monotonic() - start
        body = {"model": args.served_model_name, "prompt": [10, 11, 12, 13], "max_tokens": 1}
        reply = httpx.post(server.base_url + "/completions", json=body, timeout=args.timeout)
        first_token = time.monotonic() - start
        log = server.log()
    finally:
        server.close()
    captured = re.search(r"captured in ([0-9.]+) s", log)
    return {"ok": reply.status_code == 200, "status_code": reply.status_code, "ready_s": ready,
            "first_token_s": first_token, "graph_capture_s": float(captured.group(1)) if captured else None,
            "log_tail": log[-3000:]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("env", cmd_env), ("kernel", cmd_kernel), ("memory", cmd_memory), ("coldstart", cmd_coldstart)):
        p = sub.add_parser(name, help=fn.__doc__.split("\n")[0] if fn.__doc__ else name)
        p.add_argument("--json", required=True, help="write the step's result here")
        p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
        p.set_defaults(func=fn)
        if name == "kernel":
            p.add_argument("--batch", type=int, default=64)
            p.add_argument("--context", type=int, default=2048)
        if name == "memory":
            p.add_argument("--model", default="configs/llama-3.1-8b")
            p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
            p.add_argument("--max-model-len", type=int, default=4096)
            p.add_argument("--num-prompts", type=int, default=64)
            p.add_argument("--input-len", type=int, default=512)
            p.add_argument("--output-len", type=int, default=16)
        if name == "coldstart":
            p.add_argument("--served-model-name", default="dummy-8b")
            p.add_argument("--timeout", type=float, default=240.0)
            p.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the `pagellm serve` arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "serve_args", None) and args.serve_args[0] == "--":
        args.serve_args = args.serve_args[1:]
    result = args.func(args)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=2, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
