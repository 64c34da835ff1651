"""GPU measurements of the Triton backend against the hardware's limits (H100 SXM by default).

    python -m pagellm.benchmarks.triton_bench [--out results.json] [--model configs/llama-3.1-8b]

1. Decode attention (one query token per request, Llama-3.1-8B heads: 32 q / 8 kv, head size 128,
   bf16) at several batch sizes and context lengths: KV bytes read per second as a fraction of
   HBM bandwidth (decode attention is memory bound), with and without split-KV.
2. Prefill attention (causal, one long prompt): FLOP/s as a fraction of dense bf16 tensor-core peak.
3. One decode step of the whole model (dummy weights) at several batch sizes, CUDA graphs on and
   off: step time against the bandwidth floor (all weights + the batch's KV read once per step),
   and a torch.profiler table of where an eager step's GPU time goes.

Peaks are arguments: --peak-tbps (HBM TB/s) and --peak-tflops (dense bf16 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from pagellm.attention.triton_unified_attention import unified_attention

H100_SXM_TBPS = 3.35
H100_SXM_BF16_TFLOPS = 989.0


def time_ms(fn: Callable[[], None], warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of fn in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def _paged_inputs(query_lens: list[int], seq_lens: list[int], hq: int, hkv: int, d: int, block_size: int,
                  dtype: torch.dtype, device: str):
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.zeros((len(seq_lens), max(counts)), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(counts):
        tables[i, :n] = perm[used:used + n]
        used += n
    t = sum(query_lens)
    q = torch.randn(t, hq, d, dtype=dtype, device=device)
    cache = torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    qsl = torch.tensor([0] + query_lens, device=device).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, cache, qsl, lens, tables


def bench_decode_attention(batch: int, context: int, splits: int | None, peak_tbps: float, hq: int = 32,
                           hkv: int = 8, d: int = 128, block_size: int = 16, device: str = "cuda") -> dict:
    q, cache, qsl, lens, tables = _paged_inputs([1] * batch, [context] * batch, hq, hkv, d, block_size,
                                                torch.bfloat16, device)
    out = torch.empty_like(q)
    ms = time_ms(lambda: unified_attention(q, cache[0], cache[1], out, qsl, lens, tables, 1, context, d ** -0.5,
                                           num_splits=splits))
    kv_bytes = 2 * batch * context * hkv * d * cache.element_size()
    tbps = kv_bytes / (ms * 1e-3) / 1e12
    return dict(batch=batch, context=context, splits=splits or "auto", ms=round(ms, 4), tbps=round(tbps, 3),
                roofline=round(tbps / peak_tbps, 3))


def bench_prefill_attention(seq: int, peak_tflops: float, hq: int = 32, hkv: int = 8, d: int = 128,
                            block_size: int = 16, device: str = "cuda") -> dict:
    q, cache, qsl, lens, tables = _paged_inputs([seq], [seq], hq, hkv, d, block_size, torch.bfloat16, device)
    out = torch.empty_like(q)
    ms = time_ms(lambda: unified_attention(q, cache[0], cache[1], out, qsl, lens, tables, seq, seq, d ** -0.5))
    flops = 4 * hq * d * seq * (seq + 1) / 2  # QK^T and PV over the causal half
    tflops = flops / (ms * 1e-3) / 1e12
    return dict(seq=seq, ms=round(ms, 3), tflops=round(tflops, 1), roofline=round(tflops / peak_tflops, 3))


def _decode_core(model_dir: str, batch: int, context: int, enforce_eager: bool):
    """An engine on dummy weights with `batch` requests already past their prompts of `context` tokens."""
    from pagellm.config import EngineConfig
    from pagellm.engine.core import EngineCore, EngineCoreRequest
    from pagellm.engine.setup import ModelSetup, text_config
    from pagellm.loader import load_hf_config, resolve_model_source
    from pagellm.sampling_params import SamplingParams

    config = EngineConfig(model=model_dir, load_format="dummy", max_model_len=context + 1024, max_num_seqs=batch,
                          enforce_eager=enforce_eager, enable_prefix_caching=False)
    source = resolve_model_source(model_dir, "dummy")
    model_config = text_config(load_hf_config(source))
    setup = ModelSetup(config.resolve(model_max_len=model_config.max_position_embeddings, cuda_available=True),
                       source, model_config)
    core = EngineCore.from_config(setup, quiet=True)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for i in range(batch):
        core.add_request(EngineCoreRequest(str(i), [(i * 31 + j) % 1000 + 10 for j in range(context)], params))
    while any(r.num_computed_tokens < context for r in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    return core, model_config


def bench_decode_step(model_dir: str, batch: int, context: int, peak_tbps: float, enforce_eager: bool,
                      steps: int = 20, profile: bool = False) -> dict:
    core, model_config = _decode_core(model_dir, batch, context, enforce_eager)
    torch.cuda.synchronize()
    ms = time_ms(lambda: core.step(), warmup=3, iters=steps)  # every step is decode-only now
    weights = sum(p.numel() * p.element_size() for p in core.runner.model.parameters())
    from pagellm.worker.kv_cache import kv_bytes_per_token

    kv = batch * (context + steps) * kv_bytes_per_token(model_config, core.runner.dtype)
    floor_ms = (weights + kv) / (peak_tbps * 1e12) * 1e3
    result = dict(batch=batch, context=context, cuda_graphs=not enforce_eager, step_ms=round(ms, 3),
                  tokens_per_s=round(batch / ms * 1e3, 1), floor_ms=round(floor_ms, 3),
                  roofline=round(floor_ms / ms, 3))
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            core.step()
            torch.cuda.synchronize()
        result["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    del core
    torch.cuda.empty_cache()
    return result


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/llama-3.1-8b", help="config directory for the decode-step part")
    parser.add_argument("--peak-tbps", type=float, default=H100_SXM_TBPS)
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS)
    parser.add_argument("--skip-model", action="store_true", help="kernels only")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("triton_bench needs a CUDA GPU")
    results: dict = {"device": torch.cuda.get_device_name()}

    decode = [bench_decode_attention(b, c, s, args.peak_tbps)
              for b in (1, 8, 64, 256) for c in (1024, 8192) for s in (1, None)]
    results["decode_attention"] = decode
    print("## Decode attention (bf16, 32 q / 8 kv heads, head 128, block 16)\n")
    print(_table(decode, ["batch", "context", "splits", "ms", "tbps", "roofline"]), "\n", flush=True)

    prefill = [bench_prefill_attention(s, args.peak_tflops) for s in (1024, 4096, 16384)]
    results["prefill_attention"] = prefill
    print("## Prefill attention (causal, one prompt)\n")
    print(_table(prefill, ["seq", "ms", "tflops", "roofline"]), "\n", flush=True)

    if not args.skip_model:
        steps = []
        for batch in (1, 32, 128):
            for eager in (True, False):
                steps.append(bench_decode_step(args.model, batch, 1024, args.peak_tbps, eager,
                                               profile=eager and batch == 32))
                print(steps[-1].get("profile", ""), flush=True)
        results["decode_step"] = steps
        print(f"## Decode step, {args.model}, dummy weights, context 1024\n")
        print(_table(steps, ["batch", "cuda_graphs", "step_ms", "tokens_per_s", "floor_ms", "roofline"]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
