"""Speculative decoding against plain decoding, side by side in one run (the targets of that work).

    python scripts/bench_spec.py                                  # SmolLM2: ngram and suffix, the three targets
    python scripts/bench_spec.py --methods ngram --sweep 1,2,4,8,16,32,64 --json out.json

Each method gets one engine (`--speculative-config` with `num_speculative_tokens` = `--k` and
the adaptive batch-size switch off unless `--threshold` is given), next to one plain engine;
runs alternate (off, on, off, on, ...) so a noisy machine hits both alike, and the ratio is the
mean output tok/s with speculation over the mean without. Workloads (greedy, `ignore_eos`):

1. `edit-like` at batch 1: rewrite-this-block prompts whose answer copies most of the prompt.
2. `random` at batch 1: random token prompts, where proposals rarely match.
3. `random` 64 x 128 / 128 (`--big`): a full batch, the case the adaptive switch protects.
4. `--sweep`: random prompts at each batch size with the switch off, for choosing
   `disable_by_batch_size` (the largest batch where speculation still pays).
Acceptance (proposed, accepted, mean accepted length) comes from the engine's counters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagellm import LLM, SamplingParams  # noqa: E402
from pagellm.benchmarks.datasets import make_dataset, ordinary_token_ids  # noqa: E402
from pagellm.benchmarks.speculation import format_spec, spec_snapshot, spec_summary  # noqa: E402
from pagellm.loader import default_model_path  # noqa: E402


def run(llm: LLM, samples, output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    before = spec_snapshot(llm.llm_engine)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": s.prompt_token_ids} for s in samples], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1),
            "speculation": spec_summary(before, spec_snapshot(llm.llm_engine)),
            "outputs": [o.outputs[0].token_ids for o in outs]}


def compare(name: str, plain: LLM, spec: LLM, samples, output_len: int, repeats: int, warm_batch: bool = False) -> dict:
    off, on = [], []
    # First-call costs of these shapes out of the timing (the whole batch for a big one: its
    # batch shapes are new to both engines).
    warm = samples if warm_batch else [samples[0]]
    run(plain, warm, min(output_len, 16))
    run(spec, warm, min(output_len, 16))
    for _ in range(repeats):
        off.append(run(plain, samples, output_len))
        on.append(run(spec, samples, output_len))
    same = all(a["outputs"] == b["outputs"] for a, b in zip(off, on))
    ratio = statistics.mean(r["tok_s"] for r in on) / statistics.mean(r["tok_s"] for r in off)
    spec_line = on[-1]["speculation"]
    for r in off + on:
        del r["outputs"]
    print(f"{name}: off {[r['tok_s'] for r in off]} tok/s, on {[r['tok_s'] for r in on]} tok/s, "
          f"ratio {ratio:.3f}, same greedy tokens: {same}\n    {format_spec(spec_line)}", flush=True)
    return {"workload": name, "off": off, "on": on, "ratio": round(ratio, 3), "same_tokens": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="target model (default: the embedded SmolLM2)")
    parser.add_argument("--methods", default="ngram,suffix", help="comma list: ngram, suffix, draft_model")
    parser.add_argument("--draft-model", default=None, help="draft_model's model path")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--threshold", type=int, default=None,
                        help="disable_by_batch_size for every run (default: 0 for the sweep, the config's default otherwise)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--edit-len", type=int, default=256, help="edit-like block size (tokens)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--big", action="store_true", help="also 64 x 128/128 random")
    parser.add_argument("--sweep", default="", help="comma list of batch sizes (random prompts, switch off)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = args.model or default_model_path()
    common = dict(max_model_len=1024, quiet=True)
    plain = LLM(model, **common)
    tokenizer = plain.get_tokenizer()
    pool = ordinary_token_ids(tokenizer, plain.llm_engine.setup.vocab_size)
    edit = make_dataset("edit-like", pool, num_prompts=4, input_len=args.edit_len, output_len=args.output_len,
                        tokenizer=tokenizer)
    random1 = make_dataset("random", pool, num_prompts=1, input_len=128, output_len=args.output_len, seed=1)
    results: dict = {"command": " ".join(sys.argv), "k": args.k, "methods": {}}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = {"method": method, "num_speculative_tokens": args.k}
        if method == "draft_model":
            config["model"] = args.draft_model or model
        if args.threshold is not None:
            config["disable_by_batch_size"] = args.threshold
        spec = LLM(model, speculative_config=config, **common)
        rows = []
        for i, sample in enumerate(edit[:2]):
            rows.append(compare(f"{method} edit-like batch 1 (#{i})", plain, spec, [sample], args.output_len,
                                args.repeats))
        rows.append(compare(f"{method} random batch 1", plain, spec, random1, args.output_len, args.repeats))
        if args.big:
            big = make_dataset("random", pool, num_prompts=64, input_len=128, output_len=128, seed=2)
            rows.append(compare(f"{method} random 64 x 128/128", plain, spec, big, 128, args.repeats, warm_batch=True))
        if args.sweep:
            sweep_config = dict(config, disable_by_batch_size=0)
            sweeper = spec if args.threshold == 0 else LLM(model, speculative_config=sweep_config, **common)
            for batch in [int(b) for b in args.sweep.split(",")]:
                samples = make_dataset("random", pool, num_prompts=batch, input_len=128, output_len=64, seed=3)
                rows.append(compare(f"{method} sweep random batch {batch} (switch off)", plain, sweeper, samples,
                                    64, 1))
                edits = make_dataset("edit-like", pool, num_prompts=batch, input_len=args.edit_len, output_len=64,
                                     tokenizer=tokenizer, seed=3)
                rows.append(compare(f"{method} sweep edit-like batch {batch} (switch off)", plain, sweeper, edits,
                                    64, 1))
        results["methods"][method] = rows
        spec.llm_engine.core.executor.shutdown()
        del spec
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
