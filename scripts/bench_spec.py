"""Speculative decoding against plain decoding, side by side in one run (the targets of that work).

    python scripts/bench_spec.py                                  # SmolLM2: ngram and suffix, the three targets
    python scripts/bench_spec.py --methods ngram --sweep 1,2,4,8,16,32,64 --json out.json

Each method gets one engine (`--speculative-config` with `num_speculative_tokens` = `--k` and
the adaptive batch-size switch off unless `--threshold` is given), next to one plain engine;
runs alternate (off, on, off, on, ...) so a noisy machine hits both alike, and the ratio is the
mean output tok/s with speculation over the mean without. Workloads (greedy unless said, `ignore_eos`):

1. `edit-like` at batch 1: rewrite-this-block prompts whose answer copies most of the prompt: the
   first two alone, then all `--edit-prompts` (every kind: typos, rename, JSON) one after another.
2. `random` at batch 1: random token prompts. Greedy, SmolLM2 soon repeats itself there (so
   proposals match); seeded sampling at temperature 1 (4 prompts in turn) is where they rarely
   do, the case the per-request draft length (`draft_token_cost`) protects.
3. `random` 64 x 128 / 128 (`--big`): a full batch, the case the adaptive switch protects.
4. `--sweep`: random prompts at each batch size with the switch off, for choosing
   `disable_by_batch_size` (the largest batch where speculation still pays).
Acceptance (proposed, accepted, mean accepted length) comes from the engine's counters.

Each workload runs the same prompts several times, so suffix decoding's global tree (outputs of
earlier finished requests) would hold the very answer being measured and accept nearly every
proposal, even on random prompts. The bench therefore turns that tree off by default
(`suffix_max_cached_requests` 0: proposals come from the request's own prompt and output only);
`--suffix-cached-requests N` measures with it.
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


def run(llm: LLM, samples, output_len: int, one_at_a_time: bool = False, temperature: float = 0.0) -> dict:
    """One generate call over `samples` (a batch), or one call per sample (`one_at_a_time`: batch 1 in turn).
    Greedy, or seeded sampling at `temperature`."""
    params = SamplingParams(temperature=temperature, seed=7 if temperature > 0 else None, max_tokens=output_len,
                            ignore_eos=True)
    before = spec_snapshot(llm.llm_engine)
    groups = [[s] for s in samples] if one_at_a_time else [samples]
    start = time.perf_counter()
    outs = [o for group in groups for o in llm.generate([{"prompt_token_ids": s.prompt_token_ids} for s in group],
                                                       params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 1),
            "speculation": spec_summary(before, spec_snapshot(llm.llm_engine)),
            "outputs": [o.outputs[0].token_ids for o in outs]}


def compare(name: str, plain: LLM, spec: LLM, samples, output_len: int, repeats: int, warm_batch: bool = False,
            one_at_a_time: bool = False, temperature: float = 0.0) -> dict:
    off, on = [], []
    # First-call costs of these shapes out of the timing (the whole batch for a big one: its
    # batch shapes are new to both engines; every prompt for the in-turn rows).
    warm = samples if warm_batch or one_at_a_time else [samples[0]]
    run(plain, warm, min(output_len, 16), one_at_a_time)
    run(spec, warm, min(output_len, 16), one_at_a_time)
    for _ in range(repeats):
        off.append(run(plain, samples, output_len, one_at_a_time, temperature))
        on.append(run(spec, samples, output_len, one_at_a_time, temperature))
    # Sampling: speculation keeps the distribution, not the draws, so only greedy rows compare tokens.
    same = all(a["outputs"] == b["outputs"] for a, b in zip(off, on)) if temperature == 0 else "n/a (sampled)"
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
    parser.add_argument("--suffix-cached-requests", type=int, default=0,
                        help="suffix_max_cached_requests (default 0: see above)")
    parser.add_argument("--edit-prompts", type=int, default=6, help="edit-like prompts for the in-turn row")
    parser.add_argument("--cpu-int8-activations", action="store_true", help="both engines (EngineConfig)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--edit-len", type=int, default=256, help="edit-like block size (tokens)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--big", action="store_true", help="also 64 x 128/128 random")
    parser.add_argument("--sweep", default="", help="comma list of batch sizes (random prompts, switch off)")
    parser.add_argument("--draft-token-cost", type=float, default=None,
                        help="draft_token_cost (default: the device's; 0: always --k proposals)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = args.model or default_model_path()
    common = dict(max_model_len=1024, quiet=True, cpu_int8_activations=args.cpu_int8_activations)
    plain = LLM(model, **common)
    tokenizer = plain.get_tokenizer()
    pool = ordinary_token_ids(tokenizer, plain.llm_engine.setup.vocab_size)
    edit = make_dataset("edit-like", pool, num_prompts=max(args.edit_prompts, 2), input_len=args.edit_len,
                        output_len=args.output_len, tokenizer=tokenizer)
    random1 = make_dataset("random", pool, num_prompts=1, input_len=128, output_len=args.output_len, seed=1)
    random4 = make_dataset("random", pool, num_prompts=4, input_len=128, output_len=args.output_len, seed=5)
    results: dict = {"command": " ".join(sys.argv), "k": args.k, "methods": {}}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = {"method": method, "num_speculative_tokens": args.k}
        if method == "suffix":
            config["suffix_max_cached_requests"] = args.suffix_cached_requests
        if method == "draft_model":
            config["model"] = args.draft_model or model
        if args.threshold is not None:
            config["disable_by_batch_size"] = args.threshold
        if args.draft_token_cost is not None:
            config["draft_token_cost"] = args.draft_token_cost
        spec = LLM(model, speculative_config=config, **common)
        rows = []
        for i, sample in enumerate(edit[:2]):
            rows.append(compare(f"{method} edit-like batch 1 (#{i})", plain, spec, [sample], args.output_len,
                                args.repeats))
        rows.append(compare(f"{method} edit-like batch 1 (all {len(edit)} prompts in turn)", plain, spec, edit,
                            args.output_len, args.repeats, one_at_a_time=True))
        rows.append(compare(f"{method} random batch 1", plain, spec, random1, args.output_len, args.repeats))
        rows.append(compare(f"{method} random batch 1, 4 prompts in turn, temperature 1", plain, spec, random4,
                            args.output_len, args.repeats, one_at_a_time=True, temperature=1.0))
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
