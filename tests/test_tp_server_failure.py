"""A tensor-parallel rank killed under `pagellm serve -tp 2`: the request in flight fails, /health
says 503 while the server stops, the server exits non-zero within 10 s and leaves no rank behind."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil

from pagellm.benchmarks.server_process import ServerProcess


def _rank_processes(server: psutil.Process) -> list[psutil.Process]:
    # The engine core's spawned children that run a rank (multiprocessing's resource tracker does not).
    return [p for p in server.children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline()) and p.parent() and p.parent().pid != server.pid]


def test_killed_rank_stops_the_server(tiny_chat_model):
    server = ServerProcess([tiny_chat_model, "-tp", "2", "--max-model-len", "256", "--kv-cache-memory",
                            str(16 << 20), "--max-num-seqs", "4"])
    try:
        server.start(timeout=180)
        proc = psutil.Process(server.proc.pid)
        ranks = _rank_processes(proc)
        assert len(ranks) == 2, [p.cmdline() for p in proc.children(recursive=True)]
        everything = [p.pid for p in proc.children(recursive=True)]
        body = {"model": tiny_chat_model, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True,
                "temperature": 0, "stream": True}
        chunks, error = 0, None
        with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            try:
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        break
                    chunks += 1
                    if chunks == 1:
                        os.kill(ranks[1].pid, signal.SIGKILL)
                        killed_at = time.monotonic()
            except httpx.HTTPError as exc:  # the connection dropped as the server stopped: also a failure
                error = repr(exc)
        assert chunks >= 1 and error is not None, f"the request finished ({chunks} chunks) despite the dead rank"
        # Until the server process is gone, /health must never say healthy again.
        statuses = []
        while server.proc.poll() is None and time.monotonic() - killed_at < 10:
            try:
                statuses.append(httpx.get(server.url + "/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert server.proc.wait(timeout=max(0.1, 10 - (time.monotonic() - killed_at))) != 0, server.log()
        assert time.monotonic() - killed_at < 10
        print("health after the kill:", statuses, "request error:", error)
        assert 200 not in statuses and set(statuses) <= {503}, statuses
        deadline = time.monotonic() + 5
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in everything):
            assert time.monotonic() < deadline, "processes outlived the server"
            time.sleep(0.1)
    finally:
        server.close()
