"""Structured outputs against none, side by side in one run (the targets of the structured-outputs work).

    python scripts/bench_structured.py                      # default embedded SmolLM2, max_model_len 512
    python scripts/bench_structured.py --requests 32 --max-tokens 64 --repeats 2 --json out.json

1. Throughput: `--requests` concurrent chat requests (greedy, `ignore_eos`, `max_tokens`) with a
   30-field json_schema vs the same without; output tok/s of each and their ratio. The schema is
   longer than `max_tokens`, so both runs make the same number of tokens. Runs alternate
   (free, json, free, json, ...) so a noisy machine hits both alike. Also per step: the time the
   core's bitmask fill took (on its thread, during the forward), how long the runner still had to
   wait for it, and the time to apply it to the logits.
2. Grammar compile of a 30-field schema on each backend: cold (distinct schemas, fresh compiles)
   and cached (the manager's cache, params built anew each time as a request does); p50 / p99 ms.
3. TTFT (one request, `max_tokens=1`, distinct prompts so the prefix cache never helps) with an
   already-compiled grammar vs none, alternating; medians.
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
from pagellm.structured_output import bitmask as bitmask_module  # noqa: E402
from pagellm.structured_output.manager import StructuredOutputManager, make_backend  # noqa: E402
from pagellm.structured_output.params import StructuredOutputsParams  # noqa: E402


def schema_30_fields(tag: str = "") -> dict:
    """30 required fields of bounded strings, integers, booleans, enums and small arrays."""
    kinds = [{"type": "string", "maxLength": 16}, {"type": "integer", "minimum": 0, "maximum": 9999},
             {"type": "boolean"}, {"enum": ["low", "medium", "high"]},
             {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}]
    props = {f"field_{tag}{i}": kinds[i % len(kinds)] for i in range(30)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class StepProbe:
    """Times the bitmask fill, the runner's wait for it and its application, per step."""

    def __init__(self, llm: LLM) -> None:
        self.fill_ms: list[float] = []
        self.wait_ms: list[float] = []
        self.apply_ms: list[float] = []
        grammars = llm.llm_engine.core.grammars
        original_attach = grammars.attach_bitmask

        def attach(sched, scheduler):
            original_attach(sched, scheduler)
            manager = grammars._manager
            if manager is not None and not hasattr(manager, "_probed"):
                self._probe_fill(manager)

        grammars.attach_bitmask = attach
        original_resolve, original_apply = bitmask_module.resolve_bitmask, bitmask_module.apply_bitmask_

        def resolve(mask):
            start = time.perf_counter()
            out = original_resolve(mask)
            if mask is not None:
                self.wait_ms.append((time.perf_counter() - start) * 1e3)
            return out

        def apply(*args, **kwargs):
            start = time.perf_counter()
            original_apply(*args, **kwargs)
            self.apply_ms.append((time.perf_counter() - start) * 1e3)

        bitmask_module.resolve_bitmask, bitmask_module.apply_bitmask_ = resolve, apply

    def _probe_fill(self, manager: StructuredOutputManager) -> None:
        original = manager.fill_bitmask

        def fill(rows, num_rows):
            start = time.perf_counter()
            out = original(rows, num_rows)
            self.fill_ms.append((time.perf_counter() - start) * 1e3)
            return out

        manager.fill_bitmask, manager._probed = fill, True

    def take(self) -> dict:
        out = {name: round(statistics.mean(values), 2) if values else None for name, values in
               (("fill_ms_per_step", self.fill_ms), ("wait_ms_per_step", self.wait_ms),
                ("apply_ms_per_step", self.apply_ms))}
        self.fill_ms, self.wait_ms, self.apply_ms = [], [], []
        return out


def bench_throughput(llm: LLM, probe: StepProbe, args) -> dict:
    conversations = [[{"role": "user", "content": f"Describe product number {i} as a JSON record."}]
                     for i in range(args.requests)]
    constraint = StructuredOutputsParams(json=schema_30_fields())
    params = {
        "none": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True),
        "json_schema": SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                      structured_outputs=constraint),
    }
    # Warm both paths at the full batch (first-use costs of batch shapes; tokenizer, backend, grammar).
    for warm in (None, constraint):
        llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                               structured_outputs=warm), use_tqdm=False)
    probe.take()
    runs = []
    for repeat in range(args.repeats):
        pair = {}
        for name in ("none", "json_schema"):
            start = time.perf_counter()
            outputs = llm.chat(conversations, params[name], use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            pair[name] = {"tokens": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1),
                          **probe.take()}
            if name == "json_schema":
                for o in outputs:  # the output is a prefix of a valid record: it starts as one
                    assert o.outputs[0].text.lstrip().startswith("{"), o.outputs[0].text[:40]
            print(f"throughput repeat {repeat} {name}: {pair[name]}", flush=True)
        pair["ratio"] = round(pair["json_schema"]["tok_s"] / pair["none"]["tok_s"], 3)
        print(f"throughput repeat {repeat}: json_schema / none = {pair['ratio']}", flush=True)
        runs.append(pair)
    return {"requests": args.requests, "max_tokens": args.max_tokens, "runs": runs}


def bench_compile(llm: LLM, args) -> dict:
    tokenizer = llm.get_tokenizer()
    model_config = llm.llm_engine.setup.model_config
    from pagellm.engine.processor import model_eos_token_ids

    eos = sorted(model_eos_token_ids(tokenizer, model_config))
    result = {}
    for backend_name in ("xgrammar", "guidance"):
        manager = StructuredOutputManager(make_backend(backend_name, tokenizer, model_config.vocab_size, eos),
                                          model_config.vocab_size)
        cold = []
        for i in range(args.compiles):
            params = StructuredOutputsParams(json=schema_30_fields(f"{backend_name}{i}_"))
            start = time.perf_counter()
            manager.compile(params)
            cold.append((time.perf_counter() - start) * 1e3)
        schema = schema_30_fields(f"{backend_name}0_")
        cached = []
        for _ in range(200):
            start = time.perf_counter()
            manager.compile(StructuredOutputsParams(json=schema))
            cached.append((time.perf_counter() - start) * 1e3)
        manager.shutdown()
        result[backend_name] = {
            "cold_p50_ms": round(percentile(cold, 50), 2), "cold_p99_ms": round(percentile(cold, 99), 2),
            "cached_p50_ms": round(percentile(cached, 50), 4), "cached_p99_ms": round(percentile(cached, 99), 4),
            "cold_n": len(cold), "cached_n": len(cached)}
        print(f"compile {backend_name}: {result[backend_name]}", flush=True)
    return result


def bench_ttft(llm: LLM, args) -> dict:
    constraint = StructuredOutputsParams(json=schema_30_fields())
    params = {"none": SamplingParams(temperature=0.0, max_tokens=1),
              "cached_grammar": SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=constraint)}
    llm.generate(["warm"], params["cached_grammar"], use_tqdm=False)  # compiled and cached from here on
    times: dict[str, list[float]] = {name: [] for name in params}
    for i in range(args.ttft_runs):
        for j, name in enumerate(params):
            # The same length for both (one letter differs), new each run so the prefix cache never helps.
            prompt = f"Record {i:03d}{'ab'[j]}: describe a product in a few words, then give its JSON record."
            start = time.perf_counter()
            llm.generate([prompt], params[name], use_tqdm=False)
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {f"{name}_p50_ms": round(statistics.median(values), 1) for name, values in times.items()}
    out["ratio"] = round(out["cached_grammar_p50_ms"] / out["none_p50_ms"], 3)
    out["runs"] = args.ttft_runs
    print(f"ttft: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of throughput runs")
    parser.add_argument("--compiles", type=int, default=20, help="distinct schemas compiled cold per backend")
    parser.add_argument("--ttft-runs", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput,compile,ttft")
    parser.add_argument("--backend", default="auto", choices=("auto", "xgrammar", "guidance"),
                        help="structured-outputs backend of the throughput and TTFT runs")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"throughput", "compile", "ttft"}:
        raise ValueError(f"--skip: unknown parts {sorted(skip - {'throughput', 'compile', 'ttft'})}")

    llm = LLM(args.model, max_model_len=args.max_model_len, structured_outputs_backend=args.backend, quiet=True)
    probe = StepProbe(llm)
    results = {"command": " ".join(sys.argv), "device": llm.llm_engine.config.device}
    if "throughput" not in skip:
        results["throughput"] = bench_throughput(llm, probe, args)
    if "compile" not in skip:
        results["compile"] = bench_compile(llm, args)
    if "ttft" not in skip:
        results["ttft"] = bench_ttft(llm, args)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
