"""`pagellm bench serve`: load any OpenAI-compatible server (pagellm, vLLM, llama.cpp) with
streaming requests and report TTFT / TPOT / ITL / E2E and throughput (see `metrics.py`).

Requests arrive as a Poisson process at `request_rate` per second (inf: all at once), and at
most `max_concurrency` are in flight. Token counts come from the server's usage
(`stream_options.include_usage`); a server that sends no usage gets the number of content
chunks as its output count, which is flagged in the result.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import httpx
from tqdm.auto import tqdm

from pagellm.benchmarks.datasets import SampleRequest
from pagellm.benchmarks.metrics import RequestTrace, summarize

ENDPOINTS = ("completions", "chat")


@dataclass
class ServeConfig:
    base_url: str  # ".../v1"
    model: str
    endpoint: str = "completions"
    request_rate: float = math.inf
    max_concurrency: Optional[int] = None
    prompt_format: str = "text"  # text (any server) or ids (token-id prompts: completions only)
    ignore_eos: bool = True  # sent as vLLM's `ignore_eos` extra so outputs have the asked-for length
    extra_body: dict = field(default_factory=dict)
    api_key: Optional[str] = None
    timeout_s: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.prompt_format not in ("text", "ids"):
            raise ValueError(f"prompt_format must be 'text' or 'ids', got {self.prompt_format!r}")
        if self.prompt_format == "ids" and self.endpoint == "chat":
            raise ValueError("prompt_format 'ids' needs the completions endpoint (chat messages are text)")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {self.max_concurrency}")


def parse_rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"request rate must be a number or 'inf', got {text!r}") from None
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {text!r}")
    return rate


def arrival_delays(n: int, rate: float, seed: int = 0) -> list[float]:
    """Gaps before each request: exponential with mean 1/rate (a Poisson process); 0 at rate inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def request_body(cfg: ServeConfig, prompt, output_len: int) -> dict:
    body: dict = {"model": cfg.model, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _content_of(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_one(client: httpx.AsyncClient, cfg: ServeConfig, prompt, output_len: int,
                   prompt_len: int) -> RequestTrace:
    """Streams one request; never raises for a failed request (the trace says why)."""
    url = cfg.base_url.rstrip("/") + ("/chat/completions" if cfg.endpoint == "chat" else "/completions")
    trace = RequestTrace(send_time=time.perf_counter(), prompt_tokens=prompt_len)
    usage_seen = False
    try:
        async with client.stream("POST", url, json=request_body(cfg, prompt, output_len)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {response.status_code}: {body[:500]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                now = time.perf_counter()
                if _content_of(chunk, cfg.endpoint):
                    trace.chunk_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    usage_seen = True
                    trace.prompt_tokens = usage.get("prompt_tokens", trace.prompt_tokens)
                    trace.output_tokens = usage.get("completion_tokens", trace.output_tokens)
        trace.end_time = time.perf_counter()
        if not usage_seen:
            trace.output_tokens = len(trace.chunk_times)
            trace.error = "no usage in the stream: output tokens counted as content chunks"
        if not trace.chunk_times:
            raise RuntimeError("the stream carried no content")
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        trace.end_time = time.perf_counter()
        trace.success = False
        trace.error = f"{type(e).__name__}: {e}"
    return trace


async def run_load(cfg: ServeConfig, prompts: Sequence, samples: Sequence[SampleRequest],
                   show_progress: bool = True) -> tuple[float, list[RequestTrace]]:
    """Sends every prompt (arrivals per `request_rate`, at most `max_concurrency` in flight);
    returns (duration from the first send to the last completion, traces in dataset order)."""
    limit = cfg.max_concurrency or len(prompts)
    semaphore = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    bar = tqdm(total=len(prompts), desc="requests", disable=not show_progress, dynamic_ncols=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits, headers=headers) as client:
        async def limited(prompt, sample: SampleRequest) -> RequestTrace:
            async with semaphore:
                trace = await send_one(client, cfg, prompt, sample.output_len, sample.prompt_len)
            bar.update(1)
            return trace

        tasks = []
        start = time.perf_counter()
        for delay, prompt, sample in zip(arrival_delays(len(prompts), cfg.request_rate, cfg.seed), prompts, samples):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(prompt, sample)))
        traces = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return duration, list(traces)


def prepare_prompts(samples: Sequence[SampleRequest], prompt_format: str, tokenizer=None) -> list:
    """Token-id lists as they are, or their text (the server re-tokenizes it: its usage tells the real count)."""
    if prompt_format == "ids":
        return [s.prompt_token_ids for s in samples]
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer to decode the dataset's token ids (--tokenizer)")
    return [tokenizer.decode(s.prompt_token_ids, skip_special_tokens=False) for s in samples]


def benchmark(cfg: ServeConfig, samples: Sequence[SampleRequest], tokenizer=None, warmup: int = 1,
              show_progress: bool = True) -> dict:
    """One run: optional warm-up requests, then the load; the summary plus the per-request traces."""
    prompts = prepare_prompts(samples, cfg.prompt_format, tokenizer)
    if warmup > 0:
        warm_samples = [SampleRequest(s.prompt_token_ids, min(4, s.output_len)) for s in samples[:warmup]]
        warm_cfg = ServeConfig(**{**cfg.__dict__, "request_rate": math.inf})
        _, warm = asyncio.run(run_load(warm_cfg, prompts[:warmup], warm_samples, show_progress=False))
        failed = [t.error for t in warm if not t.success]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
    duration, traces = asyncio.run(run_load(cfg, prompts, samples, show_progress))
    summary = summarize(traces, duration)
    summary["usage_reported"] = all(not t.error for t in traces if t.success)
    errors = sorted({t.error for t in traces if not t.success})
    if errors:
        summary["errors"] = errors[:5]
    return {"summary": summary, "traces": [t.to_dict() for t in traces]}
