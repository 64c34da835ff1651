"""Sampler cost per step next to the model forward's, measured in one run on the CPU.

    python -m pagellm.benchmarks.sampler_cost --batch 64 --context 128 --steps 30

A decode step of `batch` requests (each with `context` tokens in the KV cache) is timed for
the model forward + logits, then the sampler is timed on those logits (vocab = the model's,
49,152 for SmolLM2) for an all-greedy batch, a mixed top-p/top-k/temperature batch with half
the rows seeded, and a batch with repetition/frequency/presence penalties. Medians in ms.

`bench_sampler` times the same three batches on random logits alone (no model), metadata build
included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch

from pagellm.attention.backend import build_metadata
from pagellm.forward_context import set_forward_context
from pagellm.sample import Sampler, SamplingMetadata, SamplingRow
from pagellm.sampling_params import SamplingParams


def _median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def _rows(kind: str, batch: int, context: int, vocab: int) -> list[SamplingRow]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context - 16,), generator=gen).tolist()
        output = torch.randint(0, vocab, (16,), generator=gen).tolist()
        generator = None
        if kind == "greedy":
            params = SamplingParams(temperature=0.0)
        elif kind == "mixed":
            params = SamplingParams(temperature=0.7 + 0.005 * i, top_p=0.9 if i % 3 else 1.0,
                                    top_k=50 if i % 4 == 0 else 0, seed=i if i % 2 == 0 else None)
            if params.seed is not None:
                generator = torch.Generator().manual_seed(i)
        else:
            params = SamplingParams(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.3,
                                    presence_penalty=0.2)
        rows.append(SamplingRow(params, prompt, output, {2}, generator))
    return rows


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    from pagellm import LLM

    llm = LLM(args.model, max_model_len=max(args.context + 16, 256), quiet=True)
    runner = llm.llm_engine.core.runner
    block_size = runner.block_size
    blocks_per_req = -(-(args.context + 1) // block_size)
    if blocks_per_req * args.batch > runner.num_blocks:
        raise SystemExit("KV cache too small for this batch; lower --batch or --context")
    block_ids = [list(range(i * blocks_per_req, (i + 1) * blocks_per_req)) for i in range(args.batch)]
    md = build_metadata([1] * args.batch, [args.context] * args.batch, block_ids, block_size, runner.device)
    input_ids = torch.randint(0, runner.vocab_size, (args.batch,))
    positions = torch.full((args.batch,), args.context, dtype=torch.long)

    logits_box: list[torch.Tensor] = []

    @torch.inference_mode()
    def forward() -> None:
        with set_forward_context(md):
            hidden = runner.model(input_ids, positions)
        logits_box[:] = [runner.model.compute_logits(hidden)]

    result = {"batch": args.batch, "context": args.context, "vocab": runner.vocab_size,
              "threads": torch.get_num_threads(), "forward_ms": _median_ms(forward, args.steps)}
    logits = logits_box[0]
    sampler = Sampler()
    for kind in ("greedy", "mixed", "penalties"):
        rows = _rows(kind, args.batch, args.context, runner.vocab_size)

        @torch.inference_mode()
        def sample() -> None:
            sampler(logits, SamplingMetadata.build(rows, runner.vocab_size, runner.device))

        result[f"sampler_{kind}_ms"] = _median_ms(sample, args.steps)
    print(json.dumps(result, indent=2))
    return result


def bench_sampler(batch: int = 64, vocab: int = 49152, steps: int = 50, device: str = "cpu") -> dict:
    """Median milliseconds per step (metadata build + sampling) for three typical batches."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen).mul_(4.0).to(dev)
    prompt = [torch.randint(0, vocab, (512,), generator=gen).tolist() for _ in range(batch)]
    output = [torch.randint(0, vocab, (128,), generator=gen).tolist() for _ in range(batch)]
    eos = {0}

    def rows_for(kind: str) -> list[SamplingRow]:
        rows = []
        for i in range(batch):
            generator = None
            if kind == "greedy":
                p = SamplingParams(temperature=0.0)
            elif kind == "mixed":
                seed = i if i % 2 == 0 else None
                p = SamplingParams(temperature=0.7 + 0.01 * i, top_p=0.9 if i % 3 else 1.0,
                                   top_k=50 if i % 4 == 0 else 0, seed=seed)
                if seed is not None:
                    generator = torch.Generator(device=dev).manual_seed(seed)
            else:
                p = SamplingParams(temperature=0.8, repetition_penalty=1.1,
                                   frequency_penalty=0.3, presence_penalty=0.2)
            rows.append(SamplingRow(p, prompt[i], output[i], eos, generator))
        return rows

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sampler = Sampler()
    results: dict[str, float] = {}
    for kind in ("greedy", "mixed", "penalties"):
        rows = rows_for(kind)
        times = []
        for _ in range(steps + 2):  # the first two are warm-up
            sync()
            start = time.perf_counter()
            meta = SamplingMetadata.build(rows, vocab, dev)
            sampler(logits, meta)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        results[f"{kind}_ms"] = statistics.median(times[2:])
    results.update(batch=batch, vocab=vocab, steps=steps, device=str(dev))
    return results


if __name__ == "__main__":
    main()
