"""`pagellm bench throughput`: offline throughput of pagellm and of HF transformers `generate`.

Both backends get the same token-id prompts and generate exactly each request's output length
(pagellm: `ignore_eos`; HF: `min_new_tokens`), greedily. pagellm takes all requests at once
(continuous batching); HF runs padded static batches in dataset order, each batch generating
until its longest request is done, at each batch size of the sweep (the best counts). Only
useful tokens are counted: a static batch's padding and the extra tokens of its shorter
requests are its cost, not its output.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from pagellm.benchmarks.datasets import SampleRequest
from pagellm.benchmarks.flops import ModelShape
from pagellm.benchmarks.speculation import spec_snapshot, spec_summary


def _rates(samples: Sequence[SampleRequest], elapsed: float, shape: Optional[ModelShape] = None,
           matmul_flops: Optional[float] = None, cached_tokens: Sequence[int] = ()) -> dict:
    input_tokens = sum(s.prompt_len for s in samples)
    output_tokens = sum(s.output_len for s in samples)
    result = {
        "num_requests": len(samples),
        "elapsed_s": elapsed,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": len(samples) / elapsed,
        "input_tokens_per_s": input_tokens / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (input_tokens + output_tokens) / elapsed,
    }
    if shape is not None:  # the model FLOPs of the work computed, and their rate
        flops = shape.total_flops((s.prompt_len, s.output_len) for s in samples)
        # Prompt tokens served from the prefix cache were not computed: take their positions' work out.
        flops -= sum(shape.request_flops(c, 1) - 2 * shape.hidden * shape.vocab for c in cached_tokens if c)
        result["model_tflops"] = flops / 1e12
        result["model_gflops_per_s"] = flops / elapsed / 1e9
        if matmul_flops:
            result["fraction_of_matmul_peak"] = flops / elapsed / matmul_flops
    return result


# -- pagellm --------------------------------------------------------------------------------------
def run_pagellm(llm, samples: Sequence[SampleRequest], shape: Optional[ModelShape] = None,
                matmul_flops: Optional[float] = None, warmup: bool = True, show_progress: bool = True) -> dict:
    """All requests queued at once, then the engine steps until they are done. Also reports the
    peak KV cache usage and the preemptions, read from the scheduler after every step."""
    from pagellm import SamplingParams
    from pagellm.engine.output_processor import OutputKind

    engine = llm.llm_engine
    if warmup:  # first-call costs (allocator, thread pool) out of the timing
        llm.generate([samples[0].prompt_token_ids[:16]],
                     SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        llm.reset_prefix_cache()  # the warm-up's blocks must not count as hits for the run
    preemptions_before = engine.core.stats().num_preemptions_total
    spec_before = spec_snapshot(engine)
    steps_before = engine.core.num_steps
    peak_kv = 0.0
    bar = tqdm(total=len(samples), desc="pagellm", disable=not show_progress, dynamic_ncols=True)
    start = time.perf_counter()
    for i, s in enumerate(samples):
        params = SamplingParams(temperature=0.0, max_tokens=s.output_len, ignore_eos=True)
        engine.add_request(f"bench-{i}", {"prompt_token_ids": s.prompt_token_ids}, params,
                           kind=OutputKind.FINAL_ONLY)
    generated = 0
    cached: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
                cached.append(out.num_cached_tokens)
                bar.update(1)
        peak_kv = max(peak_kv, engine.core.stats().kv_cache_usage)
    elapsed = time.perf_counter() - start
    bar.close()
    expected = sum(s.output_len for s in samples)
    if generated != expected:
        raise RuntimeError(f"pagellm generated {generated} tokens, expected {expected}")
    result = {"backend": "pagellm", **_rates(samples, elapsed, shape, matmul_flops, cached),
              "prefix_cache_hit_rate": sum(cached) / max(1, sum(s.prompt_len for s in samples)),
              "peak_kv_cache_usage": peak_kv,
              "preemptions": engine.core.stats().num_preemptions_total - preemptions_before,
              "engine_steps": engine.core.num_steps - steps_before}
    speculation = spec_summary(spec_before, spec_snapshot(engine))
    if speculation is not None:
        result["speculation"] = speculation
    return result


# -- HF transformers ------------------------------------------------------------------------------
def load_hf_model(source, config=None):
    """HF transformers' own load of the same checkpoint (a GGUF is dequantized), on the engine's
    device and dtype. With load_format="dummy", HF's own random init from the same config.json."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    device = config.device if config is not None else "cpu"
    dtype = getattr(torch, config.dtype) if config is not None and config.dtype != "auto" else torch.float32
    if config is not None and config.load_format == "dummy":
        hf_config = AutoConfig.from_pretrained(source.path)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    if source.kind == "gguf":
        directory, name = os.path.split(source.gguf_path)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return model.to(device).eval()


def run_hf(model, samples: Sequence[SampleRequest], batch_size: int, pad_id: int,
           max_batches: Optional[int] = None, shape: Optional[ModelShape] = None,
           matmul_flops: Optional[float] = None, show_progress: bool = True) -> dict:
    """Static batching: left-padded batches of `batch_size`, each generating its longest output length."""
    batches = [list(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    done: list[SampleRequest] = []
    generated = 0
    bar = tqdm(total=sum(len(b) for b in batches), desc=f"hf batch {batch_size}", disable=not show_progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    for batch in batches:
        width = max(s.prompt_len for s in batch)
        new = max(s.output_len for s in batch)
        device = next(model.parameters()).device
        ids = torch.tensor([[pad_id] * (width - s.prompt_len) + s.prompt_token_ids for s in batch], device=device)
        mask = torch.tensor([[0] * (width - s.prompt_len) + [1] * s.prompt_len for s in batch], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)
        generated += (out.shape[1] - width) * len(batch)
        done.extend(batch)
        bar.update(len(batch))
    elapsed = time.perf_counter() - start
    bar.close()
    result = {"backend": "hf", "batch_size": batch_size, **_rates(done, elapsed, shape, matmul_flops),
              "generated_with_padding": generated}
    return result


def best_of(results: Sequence[dict]) -> dict:
    return max(results, key=lambda r: r["output_tokens_per_s"])
