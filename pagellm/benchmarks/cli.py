"""`pagellm bench throughput | latency | serve | soak | collectives`.

Every run prints its numbers and writes one JSON (config, environment, versions, numbers)
under `--result-dir`. `throughput` and `latency` take every engine flag of `pagellm generate`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
from typing import Optional

from pagellm.benchmarks.datasets import DATASETS, SampleRequest, make_dataset, ordinary_token_ids
from pagellm.benchmarks.speculation import format_spec

DEFAULT_RESULT_DIR = "bench-results"


def _comma_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_dataset_args(p: argparse.ArgumentParser, default_prompts: int) -> None:
    g = p.add_argument_group("dataset (synthetic, seeded)")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--num-prompts", type=int, default=default_prompts)
    g.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens (random); tokens of the block to rewrite (edit-like)")
    g.add_argument("--output-len", type=int, default=128,
                   help="output tokens (random, prefix-shared); the answer's cap (edit-like)")
    g.add_argument("--num-prefixes", type=int, default=8, help="shared prompts (prefix-shared)")
    g.add_argument("--prefix-len", type=int, default=1024, help="tokens per shared prompt (prefix-shared)")
    g.add_argument("--suffix-len", type=int, default=64, help="unique tokens after the prefix (prefix-shared)")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for the run, both backends (default: torch's own choice)")


def _set_threads(args: argparse.Namespace) -> None:
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise ValueError(f"--torch-threads must be a positive integer, got {args.torch_threads}")
        import torch

        torch.set_num_threads(args.torch_threads)


def _add_result_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-dir", default=DEFAULT_RESULT_DIR,
                   help=f"where the JSON result goes (default: ./{DEFAULT_RESULT_DIR})")
    p.add_argument("--result-name", default=None, help="suffix of the result file name")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars")


def _dataset(args: argparse.Namespace, pool, seed: int, max_total: int = 2048, tokenizer=None) -> list[SampleRequest]:
    return make_dataset(args.dataset, pool, num_prompts=args.num_prompts, input_len=args.input_len,
                        output_len=args.output_len, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                        suffix_len=args.suffix_len, seed=seed, max_total=max_total, tokenizer=tokenizer)


def _dataset_config(args: argparse.Namespace, samples: list[SampleRequest]) -> dict:
    return {"dataset": args.dataset, "num_prompts": len(samples),
            "mean_input_len": sum(s.prompt_len for s in samples) / len(samples),
            "mean_output_len": sum(s.output_len for s in samples) / len(samples)}


def _print_rates(label: str, r: dict) -> None:
    line = (f"{label:<16} {r['requests_per_s']:8.2f} req/s  {r['input_tokens_per_s']:9.1f} in tok/s  "
            f"{r['output_tokens_per_s']:9.1f} out tok/s  {r['total_tokens_per_s']:9.1f} total tok/s  "
            f"({r['elapsed_s']:.1f} s)")
    if "model_gflops_per_s" in r:
        line += f"  {r['model_gflops_per_s']:.1f} model GFLOP/s"
        if "fraction_of_matmul_peak" in r:
            line += f" = {100 * r['fraction_of_matmul_peak']:.0f}% of matmul"
    if "peak_kv_cache_usage" in r:
        line += f"  peak KV {100 * r['peak_kv_cache_usage']:.0f}%  preemptions {r['preemptions']}"
    if r.get("prefix_cache_hit_rate"):
        line += f"  prefix-cache hits {100 * r['prefix_cache_hit_rate']:.1f}% of prompt tokens"
    print(line, flush=True)
    if r.get("speculation"):
        print(" " * 17 + format_spec(r["speculation"]), flush=True)


def _engine_kwargs(args: argparse.Namespace) -> dict:
    from pagellm.entrypoints.cli import engine_kwargs

    return engine_kwargs(args)


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def _max_total(samples: list[SampleRequest]) -> int:
    return max(s.prompt_len + s.output_len for s in samples)


# -- throughput -------------------------------------------------------------------------------------
def cmd_throughput(args: argparse.Namespace) -> int:
    import torch

    from pagellm.benchmarks.flops import ModelShape, matmul_flops_per_s
    from pagellm.benchmarks.results import write_result
    from pagellm.benchmarks.throughput import best_of, load_hf_model, run_hf, run_pagellm

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(backends) - {"pagellm", "hf"}
    if unknown or not backends:
        raise ValueError(f"--backend must be pagellm, hf or both comma-separated, got {args.backend!r}")
    _set_threads(args)
    kwargs = _engine_kwargs(args)
    seed = kwargs.get("seed", 0)
    show = not args.disable_tqdm

    llm = None
    if "pagellm" in backends:
        from pagellm import LLM

        llm = LLM(kwargs.pop("model", None), **kwargs)
        setup, tokenizer = llm.llm_engine.setup, llm.get_tokenizer()
    else:
        from pagellm.config import EngineConfig
        from pagellm.engine.setup import resolve_setup
        from pagellm.loader import load_tokenizer

        setup = resolve_setup(EngineConfig(**kwargs))
        tokenizer = None if setup.config.skip_tokenizer_init else load_tokenizer(setup.source)
    pool = ordinary_token_ids(tokenizer, setup.vocab_size)
    samples = _dataset(args, pool, seed, max_total=min(2048, setup.config.max_model_len), tokenizer=tokenizer)
    if llm is not None and _max_total(samples) > setup.config.max_model_len:
        raise ValueError(f"the dataset has a request of {_max_total(samples)} tokens, more than --max-model-len "
                         f"({setup.config.max_model_len})")
    shape = ModelShape.from_hf_config(setup.model_config)
    matmul = matmul_flops_per_s() if setup.config.device == "cpu" else None
    print(f"dataset {args.dataset}: {len(samples)} requests, mean {_dataset_config(args, samples)['mean_input_len']:.0f} "
          f"in / {_dataset_config(args, samples)['mean_output_len']:.0f} out; torch threads {torch.get_num_threads()}"
          + (f"; fp32 matmul peak {matmul / 1e9:.1f} GFLOP/s" if matmul else ""), flush=True)

    results: dict = {"matmul_gflops_per_s": matmul / 1e9 if matmul else None}
    if llm is not None:
        results["pagellm"] = run_pagellm(llm, samples, shape, matmul, show_progress=show)
        _print_rates("pagellm", results["pagellm"])
    if "hf" in backends:
        llm = None  # free the engine's KV cache before HF allocates
        gc.collect()
        model = load_hf_model(setup.source, setup.config)
        pad = _pad_id(tokenizer)
        run_hf(model, samples[:1], 1, pad, max_batches=1, show_progress=False)  # warm-up
        sweep = []
        for bs in args.hf_batch_size:
            sweep.append(run_hf(model, samples, bs, pad, args.hf_max_batches, shape, matmul, show_progress=show))
            _print_rates(f"hf batch {bs}", sweep[-1])
        results["hf"] = sweep
        results["hf_best"] = best_of(sweep)
        if "pagellm" in results:
            ratio = results["pagellm"]["output_tokens_per_s"] / results["hf_best"]["output_tokens_per_s"]
            results["pagellm_over_hf_best"] = ratio
            print(f"pagellm / HF best (batch {results['hf_best']['batch_size']}) = {ratio:.2f}x", flush=True)
    config = {"command": "throughput", "backend": backends, "engine": {k: str(v) for k, v in kwargs.items()},
              "hf_batch_sizes": args.hf_batch_size, "hf_max_batches": args.hf_max_batches,
              "model": setup.source.path, "seed": seed, **_dataset_config(args, samples),
              "input_len": args.input_len, "output_len": args.output_len}
    path = write_result(args.result_dir, "throughput", config, results, args.result_name)
    if path:
        print(f"result: {path}")
    return 0


# -- latency ----------------------------------------------------------------------------------------
def cmd_latency(args: argparse.Namespace) -> int:
    from pagellm import LLM
    from pagellm.benchmarks.latency import run_latency
    from pagellm.benchmarks.results import write_result

    _set_threads(args)
    kwargs = _engine_kwargs(args)
    llm = LLM(kwargs.pop("model", None), **kwargs)
    tokenizer = llm.get_tokenizer()
    pool = ordinary_token_ids(tokenizer, llm.llm_engine.setup.vocab_size)
    samples = make_dataset(args.dataset, pool, num_prompts=args.batch_size, input_len=args.input_len,
                           output_len=args.output_len, seed=kwargs.get("seed", 0), tokenizer=tokenizer)
    result = run_latency(llm, samples, args.num_iters_warmup, args.num_iters, show_progress=not args.disable_tqdm)
    e2e = result["e2e"]
    mean_in = sum(s.prompt_len for s in samples) / len(samples)
    print(f"{args.dataset} batch {args.batch_size}, in {mean_in:.0f} / out {args.output_len}: "
          f"e2e median {e2e['median_ms']:.1f} ms, "
          f"p90 {e2e['p90_ms']:.1f} ms; prefill median {result['prefill']['median_ms']:.1f} ms; "
          f"decode {result['decode_per_token_median_ms']:.2f} ms/token per step "
          f"({result['decode_tokens_per_s']:.1f} tok/s)", flush=True)
    if result.get("speculation"):
        print(format_spec(result["speculation"]), flush=True)
    config = {"command": "latency", "engine": {k: str(v) for k, v in kwargs.items()}, "batch_size": args.batch_size,
              "dataset": args.dataset, "mean_input_len": mean_in, "input_len": args.input_len,
              "output_len": args.output_len, "num_iters": args.num_iters,
              "num_iters_warmup": args.num_iters_warmup, "model": llm.llm_engine.setup.source.path}
    path = write_result(args.result_dir, "latency", config, result, args.result_name)
    if path:
        print(f"result: {path}")
    return 0


# -- serve ------------------------------------------------------------------------------------------
def _load_tokenizer(path: Optional[str]):
    from pagellm.loader import default_model_path, load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(path or default_model_path()))


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from pagellm.benchmarks.metrics import format_summary
    from pagellm.benchmarks.plot import plot_sweep
    from pagellm.benchmarks.results import write_result
    from pagellm.benchmarks.serve import ServeConfig, benchmark, parse_rate

    rates = [parse_rate(r) for r in (args.sweep_rates.split(",") if args.sweep_rates else [args.request_rate])]
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    tokenizer = _load_tokenizer(args.tokenizer)
    pool = ordinary_token_ids(tokenizer)
    samples = _dataset(args, pool, args.seed, tokenizer=tokenizer)
    base_url = args.base_url.rstrip("/")
    if not base_url.endswith("/v1"):
        base_url += "/v1"
    runs = []
    for rate in rates:
        cfg = ServeConfig(base_url=base_url, model=args.model, endpoint=args.endpoint, request_rate=rate,
                          max_concurrency=args.max_concurrency, prompt_format=args.prompt_format,
                          ignore_eos=not args.no_ignore_eos, extra_body=extra, api_key=args.api_key, seed=args.seed)
        out = benchmark(cfg, samples, tokenizer, warmup=args.num_warmups, show_progress=not args.disable_tqdm)
        label = "inf" if math.isinf(rate) else f"{rate:g}"
        print(format_summary(out["summary"], f"rate {label}, concurrency {args.max_concurrency or 'unbounded'}"),
              flush=True)
        config = {"command": "serve", "base_url": base_url, "model": args.model, "endpoint": args.endpoint,
                  "request_rate": label, "max_concurrency": args.max_concurrency, "prompt_format": args.prompt_format,
                  "ignore_eos": cfg.ignore_eos, "extra_body": extra, "seed": args.seed, "label": args.label,
                  "input_len": args.input_len, "output_len": args.output_len, **_dataset_config(args, samples)}
        numbers = dict(out) if args.save_traces else {"summary": out["summary"]}
        name = "-".join(x for x in (args.result_name, f"rate{label}") if x)
        path = write_result(args.result_dir, "serve", config, numbers, name)
        if path:
            print(f"result: {path}")
        runs.append({"label": label, "summary": out["summary"]})
    if len(runs) > 1 and args.result_dir:
        png = os.path.join(args.result_dir, f"serve-sweep{'-' + args.result_name if args.result_name else ''}.png")
        plot_sweep(runs, png, title=f"{args.label or args.model}: {args.dataset}, "
                                    f"concurrency {args.max_concurrency or 'unbounded'}")
        print(f"plot: {png}")
    return 0


def register(sub) -> None:
    from pagellm.entrypoints.cli import add_engine_args

    bench = sub.add_parser("bench", help="benchmarks: offline throughput, batch latency, serving load",
                           description=__doc__.split("\n\n")[0])
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    tp = bsub.add_parser("throughput", help="offline throughput, pagellm and/or HF transformers generate")
    add_engine_args(tp, positional_model=False)
    _add_dataset_args(tp, default_prompts=64)
    _add_threads_arg(tp)
    tp.add_argument("--backend", default="pagellm",
                    help="pagellm, hf, or pagellm,hf (both, with their ratio) (default: pagellm)")
    tp.add_argument("--hf-batch-size", type=_comma_ints, default=[32],
                    help="HF static batch size; a comma-separated list sweeps them and the best counts (default: 32)")
    tp.add_argument("--hf-max-batches", type=int, default=None,
                    help="run at most this many HF batches per batch size (rates stay comparable; default: all)")
    _add_result_args(tp)
    tp.set_defaults(func=cmd_throughput)

    lat = bsub.add_parser("latency", help="end-to-end latency of one batch; per-token decode time")
    add_engine_args(lat, positional_model=False)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--dataset", choices=("random", "edit-like"), default="random",
                     help="random ids of --input-len tokens, or edit-like prompts (a block of about --input-len "
                          "tokens to rewrite)")
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters-warmup", type=int, default=2)
    lat.add_argument("--num-iters", type=int, default=10)
    _add_threads_arg(lat)
    _add_result_args(lat)
    lat.set_defaults(func=cmd_latency)

    srv = bsub.add_parser("serve", help="load an OpenAI-compatible server (pagellm, vLLM, llama.cpp)")
    srv.add_argument("--base-url", required=True, help="server root or its /v1, e.g. http://127.0.0.1:8000")
    srv.add_argument("--model", required=True, help="model name sent in requests (the server's served name)")
    srv.add_argument("--tokenizer", default=None,
                     help="tokenizer (HF dir or .gguf) for the dataset's ids and their text (default: the embedded "
                          "SmolLM2-135M-Instruct)")
    srv.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    srv.add_argument("--prompt-format", choices=("text", "ids"), default="text",
                     help="send prompts as text (any server; it re-tokenizes) or token ids (completions only)")
    srv.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), or inf")
    srv.add_argument("--sweep-rates", default=None,
                     help="comma-separated rates (e.g. 1,2,4,inf): one run each and a throughput-latency PNG")
    srv.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    srv.add_argument("--no-ignore-eos", action="store_true",
                     help="don't send `ignore_eos` (servers that reject unknown fields); outputs may end early")
    srv.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--num-warmups", type=int, default=1, help="short requests sent before the timed run")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--label", default=None, help="name of the server under test, for the result and plot")
    srv.add_argument("--save-traces", action="store_true", help="also store every request's timestamps")
    _add_dataset_args(srv, default_prompts=64)
    _add_result_args(srv)
    srv.set_defaults(func=cmd_serve_bench)
    register_soak(bsub)
    from pagellm.benchmarks.collectives import register as register_collectives

    register_collectives(bsub, _comma_ints, _add_result_args)


# -- soak -------------------------------------------------------------------------------------------
def _first_model(base_url: str, api_key: Optional[str]) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(base_url + "/v1/models", headers=headers, timeout=30.0).json()["data"][0]["id"]


def cmd_soak(args: argparse.Namespace) -> int:
    import asyncio

    from pagellm.benchmarks.results import write_result
    from pagellm.benchmarks.server_process import ServerProcess
    from pagellm.benchmarks.soak import SoakConfig, format_report, run_soak

    server = None
    base_url, pid = args.base_url, args.server_pid
    if base_url is None:
        server = ServerProcess(args.server_args.split() if args.server_args else []).start()
        base_url, pid = server.url, server.proc.pid
    base_url = base_url.rstrip("/").removesuffix("/v1")
    model = args.model or _first_model(base_url, args.api_key)
    cfg = SoakConfig(base_url=base_url, model=model, duration_s=args.duration_min * 60.0,
                     concurrency=args.concurrency, max_tokens=args.max_tokens, abort_fraction=args.abort_fraction,
                     sample_interval_s=args.sample_interval, warmup_fraction=args.warmup_fraction, seed=args.seed,
                     api_key=args.api_key)
    try:
        report = asyncio.run(run_soak(cfg, pid))
    finally:
        if server is not None:
            report_exit = server.stop()
            server.close()
    if server is not None:
        report["server_exit_status"] = report_exit
    print(format_report(report), flush=True)
    config = {"command": "soak", "base_url": base_url, "model": model, "duration_min": args.duration_min,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "abort_fraction": args.abort_fraction,
              "server_args": args.server_args, "seed": args.seed}
    path = write_result(args.result_dir, "soak", config, report, args.result_name)
    if path:
        print(f"result: {path}")
    return 0 if report["errors"] == 0 else 1


def register_soak(bsub) -> None:
    soak = bsub.add_parser("soak", help="steady mixed load for N minutes: RSS slope, errors, latency percentiles")
    soak.add_argument("--duration-min", type=float, default=30.0, help="minutes of load (default: 30)")
    soak.add_argument("--base-url", default=None,
                      help="a running server's root; without it a `pagellm serve` is started on a free port")
    soak.add_argument("--server-pid", type=int, default=None,
                      help="with --base-url: the server's process id, for RSS sampling (else no RSS)")
    soak.add_argument("--server-args", default="", help="extra `pagellm serve` arguments for the started server")
    soak.add_argument("--model", default=None, help="model name sent in requests (default: the server's first model)")
    soak.add_argument("--concurrency", type=int, default=8, help="client workers, each one request at a time")
    soak.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request is drawn from 4..this")
    soak.add_argument("--abort-fraction", type=float, default=0.15, help="share of streams cut after 1-3 chunks")
    soak.add_argument("--sample-interval", type=float, default=5.0, help="seconds between RSS samples")
    soak.add_argument("--warmup-fraction", type=float, default=0.2, help="first share of the run left out of the slope")
    soak.add_argument("--api-key", default=None)
    soak.add_argument("--seed", type=int, default=0)
    _add_result_args(soak)
    soak.set_defaults(func=cmd_soak)
