"""`pagellm bench latency`: end-to-end latency of one batch, and its per-token decode time.

Each iteration queues `batch_size` prompts (random ids of `input_len` tokens, or `edit-like`
rewrite-this-block prompts), each generating exactly `output_len` tokens, and steps the engine until all are done. Per iteration:

    e2e     = queue -> last request finished
    prefill = queue -> every request has its first token
    decode per token = (e2e - prefill) / (output_len - 1)   (one step produces one token per request)
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from pagellm.benchmarks.datasets import SampleRequest
from pagellm.benchmarks.speculation import spec_snapshot, spec_summary


def run_batch(llm, samples: Sequence[SampleRequest], tag: str) -> dict:
    """One batch; times in seconds."""
    from pagellm import SamplingParams
    from pagellm.engine.output_processor import OutputKind

    engine = llm.llm_engine
    ids = [f"{tag}-{i}" for i in range(len(samples))]
    waiting_first = set(ids)
    start = time.perf_counter()
    for request_id, s in zip(ids, samples):
        params = SamplingParams(temperature=0.0, max_tokens=s.output_len, ignore_eos=True)
        engine.add_request(request_id, {"prompt_token_ids": s.prompt_token_ids}, params, kind=OutputKind.DELTA)
    prefill_done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                waiting_first.discard(out.request_id)
        if prefill_done is None and not waiting_first:
            prefill_done = time.perf_counter()
    end = time.perf_counter()
    output_len = samples[0].output_len
    e2e = end - start
    prefill = (prefill_done or end) - start
    decode = (e2e - prefill) / (output_len - 1) if output_len > 1 else float("nan")
    return {"e2e_s": e2e, "prefill_s": prefill, "decode_per_token_s": decode}


def summarize_latencies(values_s: Sequence[float]) -> dict:
    arr = np.asarray(values_s) * 1000.0
    return {"mean_ms": float(arr.mean()), "median_ms": float(np.median(arr)),
            "p90_ms": float(np.percentile(arr, 90)), "p99_ms": float(np.percentile(arr, 99)),
            "min_ms": float(arr.min()), "max_ms": float(arr.max())}


def run_latency(llm, samples: Sequence[SampleRequest], num_iters_warmup: int, num_iters: int,
                show_progress: bool = True) -> dict:
    if num_iters < 1:
        raise ValueError(f"--num-iters must be a positive integer, got {num_iters}")
    for i in tqdm(range(num_iters_warmup), desc="warm-up", disable=not show_progress, dynamic_ncols=True):
        run_batch(llm, samples, f"warmup{i}")
    spec_before = spec_snapshot(llm.llm_engine)
    runs = [run_batch(llm, samples, f"iter{i}")
            for i in tqdm(range(num_iters), desc="iterations", disable=not show_progress, dynamic_ncols=True)]
    decode = [r["decode_per_token_s"] for r in runs]
    result = {
        "batch_size": len(samples),
        "e2e": summarize_latencies([r["e2e_s"] for r in runs]),
        "prefill": summarize_latencies([r["prefill_s"] for r in runs]),
        "decode_per_token_median_ms": 1000.0 * statistics.median(decode),
        "decode_tokens_per_s": len(samples) / statistics.median(decode),
        "iterations": runs,
    }
    speculation = spec_summary(spec_before, spec_snapshot(llm.llm_engine))
    if speculation is not None:
        result["speculation"] = speculation
    return result
