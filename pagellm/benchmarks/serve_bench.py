"""Serving benchmark: `pagellm serve` under N concurrent streaming clients, engine in its own
process vs in the server process, measured in one run.

    python -m pagellm.benchmarks.serve_bench --num-clients 16 --num-requests 64 --input-len 64 --output-len 64

Each mode starts a real server (a subprocess on a free loopback port), warms it up, then
N clients each stream completions back to back until `num_requests` are done. Every
request has a token-id prompt of exactly `input_len` tokens and generates exactly
`output_len` tokens (EOS ignored). Reported per mode: request throughput, output tokens/s,
TTFT p50/p99 (request sent -> first token chunk) and ITL p50/p99 (gaps between chunks).

`ServerProcess` (start a server, wait for /health, stop it with SIGTERM) is also what the
server tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pagellm.entrypoints.cli serve ARGS` on 127.0.0.1:<free port>, as a context manager."""

    def __init__(self, args: list[str], env: Optional[dict[str, str]] = None, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="pagellm-serve-", suffix=".log", delete=False)

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "ServerProcess":
        """Starts the process and returns at once (the model loads in the background)."""
        cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        """Blocks until GET /health answers 200."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status (killed after `timeout`: -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-20000:]

    def close(self) -> None:
        """Stops the server if it runs and deletes its log."""
        self.stop()
        self._log.close()
        if os.path.exists(self._log.name):
            os.unlink(self._log.name)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- the load ----------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ttft: float
    itls: list[float]
    latency: float
    output_tokens: int


@dataclass
class ModeResult:
    mode: str
    num_requests: int
    seconds: float
    results: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict:
        ttfts = sorted(r.ttft for r in self.results)
        itls = sorted(x for r in self.results for x in r.itls)
        tokens = sum(r.output_tokens for r in self.results)
        return {
            "mode": self.mode,
            "requests": self.num_requests,
            "seconds": round(self.seconds, 2),
            "req_per_s": round(self.num_requests / self.seconds, 3),
            "output_tok_per_s": round(tokens / self.seconds, 1),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
            "itl_p50_ms": round(1000 * percentile(itls, 50), 1),
            "itl_p99_ms": round(1000 * percentile(itls, 99), 1),
        }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def stream_one(client: httpx.AsyncClient, base_url: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times: list[float] = []
    output_tokens = 0
    async with client.stream("POST", base_url + "/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream error: {data['error']}")
            if data.get("usage"):
                output_tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["text"]:
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    if output_tokens != output_len:  # aborted or cut short: its timings would not measure the same work
        raise RuntimeError(f"a request generated {output_tokens} tokens, not {output_len}")
    if not chunk_times:
        raise RuntimeError("a request streamed no text")
    itls = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return RequestResult(chunk_times[0] - start, itls, end - start, output_tokens)


async def run_load(base_url: str, prompts: list[list[int]], num_clients: int, output_len: int) -> tuple[float, list[RequestResult]]:
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                results.append(await stream_one(client, base_url, prompt, output_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(num_clients)))
        return time.perf_counter() - start, results


def random_prompts(vocab_size: int, num: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of random ordinary ids; low ids are skipped (special tokens live there in SmolLM2)."""
    rng = random.Random(seed)
    low = min(256, vocab_size // 2)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num)]


def bench_mode(mode: str, server_args: list[str], prompts: list[list[int]], num_clients: int,
               output_len: int) -> ModeResult:
    args = list(server_args) + (["--engine-in-process"] if mode == "in-process" else [])
    with ServerProcess(args + ["--disable-uvicorn-access-log"]) as server:
        warm = [p[:8] for p in prompts[:2]]
        asyncio.run(run_load(server.base_url, warm, 2, 4))
        seconds, results = asyncio.run(run_load(server.base_url, prompts, num_clients, output_len))
        status = server.stop()
        if status != 0:
            raise RuntimeError(f"the {mode} server exited with status {status}:\n{server.log()}")
    return ModeResult(mode, len(prompts), seconds, results)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--num-clients", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=49152, help="range of random prompt ids (SmolLM2: 49152)")
    parser.add_argument("--modes", default="process,in-process", help="comma-separated: process, in-process")
    parser.add_argument("--server-args", default="", help="extra `pagellm serve` flags, as one string")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"process", "in-process"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    server_args = ([args.model] if args.model else []) + args.server_args.split()
    prompts = random_prompts(args.vocab_size, args.num_requests, args.input_len)
    summaries = []
    for mode in modes:
        summary = bench_mode(mode, server_args, prompts, args.num_clients, args.output_len).summary()
        summaries.append(summary)
        if not args.json:
            print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    if args.json:
        print(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    main()
