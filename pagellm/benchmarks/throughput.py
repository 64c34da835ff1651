"""Offline throughput: pagellm vs HF transformers `generate`, side by side in one process.

    python -m pagellm.benchmarks.throughput --num-prompts 64 --input-len 100 --output-len 64

Both sides get the same token-id prompts (random words from the vocabulary, fixed seed),
generate exactly `output_len` tokens greedily (EOS ignored), and report output tokens/s.
HF runs padded static batches (left padding) at each batch size given; the best counts.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Optional

import torch


def make_prompts(tokenizer, num_prompts: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """Prompts of exactly `input_len` tokens, sampled from ordinary (non-special) vocabulary ids."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(num_prompts)]


def bench_pagellm(llm, prompts: list[list[int]], output_len: int) -> dict:
    from pagellm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "pagellm", "seconds": elapsed, "output_tokens": tokens, "output_tok_per_s": tokens / elapsed}


def bench_hf(model, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int,
             max_prompts: Optional[int] = None) -> dict:
    prompts = prompts[:max_prompts] if max_prompts else prompts
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)
        tokens += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return {"engine": f"hf(batch={batch_size})", "prompts": len(prompts), "seconds": elapsed,
            "output_tokens": tokens, "output_tok_per_s": tokens / elapsed}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-batch-sizes", default="1,8,32", help="comma-separated; empty to skip HF")
    parser.add_argument("--hf-batch1-prompts", type=int, default=8,
                        help="batch 1 is slow: run it on this many prompts (tokens/s is still a rate)")
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)

    from pagellm import LLM

    llm = LLM(args.model, max_model_len=args.input_len + args.output_len + 16, quiet=True)
    prompts = make_prompts(llm.get_tokenizer(), args.num_prompts, args.input_len)
    results = [bench_pagellm(llm, prompts, args.output_len)]
    print(json.dumps(results[-1]), flush=True)
    sizes = [int(s) for s in args.hf_batch_sizes.split(",") if s.strip()]
    if sizes:
        model = _load_hf(llm)
        pad = llm.get_tokenizer().pad_token_id or 0
        bench_hf(model, prompts[:1], 2, 1, pad)  # warm-up
        for bs in sizes:
            limit = args.hf_batch1_prompts if bs == 1 else None
            results.append(bench_hf(model, prompts, args.output_len, bs, pad, limit))
            print(json.dumps(results[-1]), flush=True)
        best_hf = max(r["output_tok_per_s"] for r in results[1:])
        print(f"pagellm / best HF = {results[0]['output_tok_per_s'] / best_hf:.2f}x", flush=True)
    summary = {"args": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _load_hf(llm):
    import os

    from transformers import AutoModelForCausalLM

    source = llm.llm_engine.setup.source
    if source.kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(source.gguf_path), gguf_file=os.path.basename(
            source.gguf_path), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
