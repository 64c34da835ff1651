"""Writes OUT/summary.md (one row per step of scripts/gpu_check.sh: verdict, seconds, key numbers, goal)
and OUT/results.json (every step's JSON), from OUT/status.tsv and the JSON/JUnit files under OUT/logs.

    python scripts/gpu_summary.py --out gpu_results [--dry-run 1]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import xml.etree.ElementTree as ET
from typing import Optional

GOALS = {
    "setup": "CUDA GPU found, wheels installed",
    "gpu_tests": "all pass (full-shape kernel grid on CUDA, interpreter cases)",
    "engine_tests": "all pass (triton+graphs vs torch eager, graphs on/off identical)",
    "kernel": "decode attention GB/s close to copy bandwidth",
    "throughput": ">= 6,000 out tok/s and >= 2.7x HF best batch",
    "latency": "<= 5.0 ms/token (floor ~3.7 ms)",
    "coldstart": "report s to first token and graph capture s",
    "memory": "KV pool within 5% of utilization x total - measured peak",
}


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def newest_result(directory: str) -> Optional[dict]:
    """The latest `pagellm bench` result JSON in a --result-dir."""
    paths = sorted(glob.glob(os.path.join(directory, "*.json")), key=os.path.getmtime)
    return read_json(paths[-1]) if paths else None


def junit_counts(path: str) -> Optional[str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def throughput_numbers(result: dict, kernel: Optional[dict]) -> str:
    r = result.get("results", {})
    parts = []
    if "pagellm" in r:
        ours = r["pagellm"]
        parts.append(f"pagellm {ours['output_tokens_per_s']:,.0f} out tok/s")
        if kernel and kernel.get("matmul_tflops") and ours.get("model_gflops_per_s"):
            # The compute roof is this machine's measured dense bf16 matmul rate (the kernel step).
            parts.append(f"{ours['model_gflops_per_s'] / 1e3 / kernel['matmul_tflops']:.0%} of measured matmul rate")
    if "hf_best" in r:
        parts.append(f"HF best {r['hf_best']['output_tokens_per_s']:,.0f} (batch {r['hf_best']['batch_size']})")
    if "pagellm_over_hf_best" in r:
        parts.append(f"{r['pagellm_over_hf_best']:.2f}x HF")
    return "; ".join(parts)


def latency_numbers(result: dict) -> str:
    r = result.get("results", {})
    return f"{r['decode_per_token_median_ms']:.2f} ms/token, e2e median {r['e2e']['median_ms']:.0f} ms"


def step_numbers(name: str, logs: str, found: dict) -> str:
    kernel, env = found.get("kernel"), found.get("env")
    if name == "setup" and env:
        return f"{env.get('device', 'no GPU')}, torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, " \
               f"python {env['python']}"
    if name in ("gpu_tests", "engine_tests"):
        return junit_counts(os.path.join(logs, f"{name}.xml")) or ""
    if name == "kernel" and kernel:
        return (f"copy {kernel['copy_gb_per_s']:,.0f} GB/s, bf16 matmul {kernel['matmul_tflops']:.0f} TFLOP/s; "
                f"decode attn b{kernel['batch']} x {kernel['context']}: {kernel['decode_attention_gb_per_s']:,.0f} GB/s "
                f"= {kernel['fraction_of_copy_bandwidth']:.0%} of copy")
    if name == "throughput" and found.get("throughput"):
        return throughput_numbers(found["throughput"], kernel)
    if name == "latency" and found.get("latency"):
        return latency_numbers(found["latency"])
    if name == "coldstart" and found.get("coldstart"):
        c = found["coldstart"]
        capture = f"{c['graph_capture_s']:.1f} s" if c.get("graph_capture_s") is not None else "not logged"
        return f"healthy {c['ready_s']:.1f} s, first token {c['first_token_s']:.1f} s, graph capture {capture}"
    if name == "memory" and found.get("memory"):
        m = found["memory"]
        return (f"KV {m['kv_pool_gib']:.2f} GiB vs expected {m['expected_kv_pool_gib']:.2f} GiB "
                f"({m['kv_over_expected']:.3f}x; peak {m['measured_peak_gib']:.2f} of {m['total_gib']:.2f} GiB)")
    return ""


def read_status(out: str) -> list[list[str]]:
    try:
        with open(os.path.join(out, "status.tsv"), encoding="utf-8") as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        return []


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", default="0")
    args = parser.parse_args(argv)
    logs = os.path.join(args.out, "logs")
    found = {name: read_json(os.path.join(logs, f"{name}.json")) for name in ("env", "kernel", "coldstart", "memory")}
    found["throughput"] = newest_result(os.path.join(logs, "throughput"))
    found["latency"] = newest_result(os.path.join(logs, "latency"))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in found.items() if v is not None}, f, indent=2, default=str)

    dry = args.dry_run == "1"
    lines = ["# GPU check" + (" (DRY RUN on the CPU: plumbing only, no number below is a GPU measurement)" if dry else ""),
             "", "| step | status | s (limit) | numbers | goal |", "|---|---|---|---|---|"]
    for name, status, seconds, _rc, limit in read_status(args.out):
        try:
            numbers = step_numbers(name, logs, found)
        except (KeyError, TypeError, ValueError) as exc:  # a partial JSON: say so rather than fail the summary
            numbers = f"(numbers unreadable: {exc!r})"
        lines.append(f"| {name} | {status} | {seconds} ({limit}) | {numbers} | {GOALS.get(name, '')} |")
    lines += ["", "Logs: logs.tgz (one log per step, the JSON and JUnit files); every number: results.json."]
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
