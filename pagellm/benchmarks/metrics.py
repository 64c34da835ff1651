"""Serving metrics from per-request traces, with vLLM's benchmark definitions.

A trace is what the client saw: when the request was sent, when each streamed chunk that
carried content arrived, when the stream ended, and the token counts the server reported.

    TTFT  = first content chunk - send time
    ITL   = gaps between consecutive content chunks (all requests' gaps pooled)
    TPOT  = (E2E - TTFT) / (output tokens - 1), per request with more than one output token
    E2E   = end of stream - send time
    request throughput = completed requests / benchmark duration; token throughputs likewise

Pure functions, no I/O: the tests feed them recorded traces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestTrace:
    """One request as the client saw it; times in seconds on one monotonic clock."""

    send_time: float
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carried content
    end_time: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    success: bool = True
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2e(self) -> float:
        return self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def distribution_ms(values_s: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """mean / median / std / pN of seconds, in milliseconds (numpy's linear percentiles, as vLLM)."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        out = {"mean": float("nan"), "median": float("nan"), "std": float("nan")}
        out.update({f"p{_fmt(p)}": float("nan") for p in percentiles})
        return out
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    out.update({f"p{_fmt(p)}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def _fmt(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def summarize(traces: Sequence[RequestTrace], duration_s: float,
              percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """Benchmark-level numbers from the traces of one run lasting `duration_s` seconds."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    percentiles = tuple(percentiles)
    ok = [t for t in traces if t.success and t.chunk_times]
    failed = len(traces) - len(ok)
    input_tokens = sum(t.prompt_tokens for t in ok)
    output_tokens = sum(t.output_tokens for t in ok)
    tpots = [t.tpot for t in ok if t.tpot is not None]
    return {
        "completed": len(ok),
        "failed": failed,
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": distribution_ms([t.ttft for t in ok], percentiles),
        "tpot_ms": distribution_ms(tpots, percentiles),
        "itl_ms": distribution_ms([x for t in ok for x in t.itls], percentiles),
        "e2el_ms": distribution_ms([t.e2e for t in ok], percentiles),
    }


def format_summary(summary: dict, title: str = "Serving benchmark") -> str:
    """A fixed-width table like vLLM's `benchmark_serving` prints."""
    lines = [f"{f' {title} ':=^60}"]

    def row(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append(f"{' ' + name + ' ':-^60}")
        short = key.split("_")[0].upper()
        for stat, value in summary[key].items():
            if stat == "std":
                continue
            label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
            row(f"{label} {short} (ms):", value)
    lines.append("=" * 60)
    return "\n".join(lines)
