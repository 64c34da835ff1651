"""Multi-LoRA serving cost, side by side in one run (the targets of the LoRA work).

    python scripts/bench_lora.py                                   # SmolLM2, 32 requests, rank 16, 1/4/8 adapters
    python scripts/bench_lora.py --ranks 8,16,64 --num-adapters 1,4,8 --json out.json

1. Throughput: `--requests` requests at once (random token prompts of `--input-len`, greedy,
   `ignore_eos`, `--output-len` tokens) on the base model alone (an engine without LoRA) and on a
   LoRA engine with the requests spread round-robin over N adapters, for each N and rank. Runs
   alternate (base, lora, base, lora, ...) so a noisy machine hits both alike; the ratio is the
   mean LoRA tok/s over the mean base tok/s.
   Before the timed runs of a setting, one untimed run on each engine loads every adapter into its
   slot and warms the batch shapes, so the ratio is the steady-state serving cost.
2. Adapter load: reading and checking one adapter directory into host tensors (what a load
   request or a first use costs before the slot copy), p50 / max ms over the adapters.

The adapters are random PEFT LoRAs on every attention and MLP projection of the model's own
shapes, built in a temporary directory with peft (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagellm import LLM, SamplingParams  # noqa: E402
from pagellm.loader import default_model_path  # noqa: E402
from pagellm.loader.hf import load_hf_config  # noqa: E402
from pagellm.loader.source import resolve_model  # noqa: E402
from pagellm.lora import LoRARequest  # noqa: E402
from pagellm.lora.adapter import load_adapter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: str, root: Path, rank: int, count: int) -> list[str]:
    """`count` random rank-`rank` PEFT adapters for the model's architecture (one PEFT model, B redrawn each)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = load_hf_config(resolve_model(model))
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                 init_lora_weights=False, lora_dropout=0.0))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        out = root / f"r{rank}-a{i}"
        peft_model.save_pretrained(str(out))
        paths.append(str(out))
    return paths


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, loras) -> dict:
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--ranks", default="16", help="comma list of adapter ranks")
    parser.add_argument("--num-adapters", default="1,4,8", help="comma list: adapters the requests spread over")
    parser.add_argument("--repeats", type=int, default=2, help="alternating base / LoRA pairs per setting")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    counts = [int(n) for n in args.num_adapters.split(",")]
    if min(ranks) < 1 or min(counts) < 1:
        raise ValueError("--ranks and --num-adapters: positive integers")
    model = args.model or default_model_path()
    common = dict(max_model_len=args.input_len + args.output_len + 16, quiet=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    base_llm = LLM(model, **common)
    vocab = base_llm.llm_engine.setup.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen).tolist() for _ in range(args.requests)]
    results: dict = {"command": " ".join(sys.argv), "requests": args.requests, "input_len": args.input_len,
                     "output_len": args.output_len, "settings": [], "load_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in ranks:
            paths = make_adapters(model, Path(tmp), rank, max(counts))
            model_config = base_llm.llm_engine.setup.model_config
            times = []
            for i, path in enumerate(paths):
                start = time.perf_counter()
                load_adapter(path, f"a{i}", i + 1, model_config, max_rank=rank)
                times.append((time.perf_counter() - start) * 1e3)
            results["load_ms"][rank] = {"p50": round(statistics.median(times), 2), "max": round(max(times), 2)}
            print(f"rank {rank}: adapter load p50 {results['load_ms'][rank]['p50']} ms, max {results['load_ms'][rank]['max']} ms")
            lora_llm = LLM(model, enable_lora=True, max_loras=max(counts), max_lora_rank=rank, **common)
            # Warm both engines, and check the adapters really change what the model writes.
            warm = [{"prompt_token_ids": p} for p in prompts[:2]]
            plain = [o.outputs[0].token_ids for o in base_llm.generate(warm, params, use_tqdm=False)]
            adapted = [o.outputs[0].token_ids for o in lora_llm.generate(
                warm, params, use_tqdm=False, lora_request=LoRARequest("a0", 1, paths[0]))]
            if plain == adapted:
                raise RuntimeError("the adapter did not change any output token: it is not applied")
            for count in counts:
                loras = [LoRARequest(f"a{i % count}", i % count + 1, paths[i % count]) for i in range(args.requests)]
                # Warm-up outside the timing: every adapter of this setting is read and put in a slot,
                # and the batch shapes run once on both engines (the first use of a shape is slower).
                run(base_llm, prompts, params, None)
                run(lora_llm, prompts, params, loras)
                base_runs, lora_runs = [], []
                for _ in range(args.repeats):
                    base_runs.append(run(base_llm, prompts, params, None))
                    lora_runs.append(run(lora_llm, prompts, params, loras))
                ratio = statistics.mean(r["tok_s"] for r in lora_runs) / statistics.mean(r["tok_s"] for r in base_runs)
                row = {"rank": rank, "adapters": count, "base": base_runs, "lora": lora_runs, "ratio": round(ratio, 3)}
                results["settings"].append(row)
                print(f"rank {rank}, {count} adapters: base {[r['tok_s'] for r in base_runs]} tok/s, "
                      f"lora {[r['tok_s'] for r in lora_runs]} tok/s, ratio {ratio:.3f}")
            lora_llm.llm_engine.core.executor.shutdown()
            del lora_llm
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
