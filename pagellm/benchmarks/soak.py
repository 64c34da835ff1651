"""`pagellm bench soak`: steady mixed load for N minutes; does the server's memory stay flat?

A fixed number of client workers loop until the time is up, each request drawn at random:
completions or chat, streamed or not, and a share of streams cut after a few chunks (a client
that goes away). Every few seconds the server's resident memory (its process and all children,
so the engine core counts) is sampled. The report:

    rss_slope_mib_per_min   least-squares slope of RSS over time after the warm-up
    errors                  requests that failed (an abort we made on purpose is not an error)
    latency_ms              p50 / p90 / p99 of end-to-end time of the requests that ran to the end
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx
import numpy as np
import psutil

PROMPTS = ("Tell me a short story about a lighthouse keeper.", "List three uses of copper.",
           "Explain what a hash table is in two sentences.", "Write a haiku about autumn rain.",
           "What is the capital of France, and why is it famous?", "Describe the water cycle briefly.")


@dataclass
class SoakConfig:
    base_url: str  # server root, no /v1
    model: str
    duration_s: float
    concurrency: int = 8
    max_tokens: int = 32
    abort_fraction: float = 0.15
    sample_interval_s: float = 5.0
    warmup_fraction: float = 0.2  # the first share of the run is left out of the RSS slope
    seed: int = 0
    api_key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s} s")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {self.concurrency}")
        if not 0.0 <= self.abort_fraction <= 1.0:
            raise ValueError(f"abort_fraction must be in [0, 1], got {self.abort_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class SoakStats:
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    aborted: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


def process_tree_rss(pid: int) -> int:
    """Bytes resident in `pid` and all its descendants (a process that just exited counts 0)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rss_slope_mib_per_min(samples: list[tuple[float, int]], warmup_s: float) -> Optional[float]:
    """Linear fit of RSS (MiB) against time (min) over the samples taken after `warmup_s`."""
    kept = [(t, rss) for t, rss in samples if t >= warmup_s]
    if len(kept) < 3:
        return None
    t = np.array([k[0] for k in kept]) / 60.0
    mib = np.array([k[1] for k in kept]) / float(1 << 20)
    return float(np.polyfit(t, mib, 1)[0])


def _body(cfg: SoakConfig, chat: bool, stream: bool, rng: random.Random) -> dict:
    prompt = rng.choice(PROMPTS)
    body: dict = {"model": cfg.model, "max_tokens": rng.randint(4, cfg.max_tokens), "stream": stream,
                  "temperature": rng.choice((0.0, 0.8))}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _one(client: httpx.AsyncClient, cfg: SoakConfig, rng: random.Random, stats: SoakStats) -> None:
    chat, stream = rng.random() < 0.5, rng.random() < 0.6
    cut_after = rng.randint(1, 3) if stream and rng.random() < cfg.abort_fraction else None
    kind = f"{'chat' if chat else 'completions'}-{'stream' if stream else 'plain'}{'-abort' if cut_after else ''}"
    stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
    url = cfg.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url, json=_body(cfg, chat, False, rng))
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            r.json()["choices"][0]
        else:
            async with client.stream("POST", url, json=_body(cfg, chat, True, rng)) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if '"error"' in line:
                        raise RuntimeError(f"stream error: {line[:200]}")
                    chunks += 1
                    if cut_after is not None and chunks >= cut_after:
                        stats.aborted += 1  # leaving the block closes the connection: the server aborts
                        return
        stats.latencies_s.append(time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - a soak counts failures and goes on
        stats.errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])


async def _sample_rss(pid: Optional[int], interval: float, start: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if pid is not None:
            out.append((time.perf_counter() - start, process_tree_rss(pid)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def run_soak(cfg: SoakConfig, server_pid: Optional[int]) -> dict:
    stats, rss = SoakStats(), []
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    start = time.perf_counter()
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server_pid, cfg.sample_interval_s, start, rss, stop))
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), headers=headers) as client:
        async def worker(i: int) -> None:
            rng = random.Random(cfg.seed * 1000 + i)
            while time.perf_counter() - start < cfg.duration_s:
                await _one(client, cfg, rng, stats)

        await asyncio.gather(*(worker(i) for i in range(cfg.concurrency)))
    stop.set()
    await sampler
    return summarize_soak(cfg, stats, rss, time.perf_counter() - start)


def summarize_soak(cfg: SoakConfig, stats: SoakStats, rss: list[tuple[float, int]], elapsed_s: float) -> dict:
    lat = np.array(stats.latencies_s) * 1000.0
    pct = {f"p{p}": (float(np.percentile(lat, p)) if lat.size else None) for p in (50, 90, 99)}
    warmup_s = cfg.duration_s * cfg.warmup_fraction
    mib = [r / float(1 << 20) for _, r in rss]
    return {
        "elapsed_s": elapsed_s,
        "completed": len(stats.latencies_s),
        "aborted_on_purpose": stats.aborted,
        "errors": len(stats.errors),
        "first_errors": stats.errors[:5],
        "requests_by_kind": dict(sorted(stats.by_kind.items())),
        "latency_ms": pct,
        "rss_slope_mib_per_min": rss_slope_mib_per_min(rss, warmup_s),
        "rss_mib": {"first": mib[0] if mib else None, "after_warmup": _first_after(rss, warmup_s),
                    "last": mib[-1] if mib else None, "max": max(mib) if mib else None, "samples": len(mib)},
        "warmup_s": warmup_s,
    }


def _first_after(samples: list[tuple[float, int]], t0: float) -> Optional[float]:
    for t, r in samples:
        if t >= t0:
            return r / float(1 << 20)
    return None


def format_report(report: dict) -> str:
    return json.dumps(report, indent=2)
