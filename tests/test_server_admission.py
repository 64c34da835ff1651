"""The server's side of engine trouble: a full queue is 429 with Retry-After, a dead engine 503
`engine_dead` on every route, a deadline 504, all in OpenAI's error shape (in-band once a stream
has started); --max-n and priority are checked; and `pagellm serve` exits with status 1 when its
engine core dies (or, with --restart-engine-on-failure, reloads it and serves again).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from pagellm.config import EngineConfig
from pagellm.engine.admission import AdmissionLimits
from pagellm.engine.exceptions import EngineDeadError, EngineOverloadedError, RequestTimeoutError
from pagellm.entrypoints.openai.limits import ServerLimits
from pagellm.entrypoints.openai.server import ServerOptions, build_app

from fake_engine import RaisingEngine

COMPLETIONS = "/v1/completions"


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


@pytest.mark.parametrize("error, status, code", [
    (EngineOverloadedError("the server is at capacity", retry_after_s=3), 429, "queue_full"),
    (EngineDeadError("engine core died: secret detail"), 503, "engine_dead"),
    (RequestTimeoutError("request x ran past its deadline and was aborted"), 504, "request_deadline_exceeded"),
])
def test_engine_errors_map_to_their_status_in_band_too(error, status, code):
    http = TestClient(build_app(RaisingEngine(error), "tiny"), raise_server_exceptions=False)
    r = http.post(COMPLETIONS, json={"prompt": [1, 2]})
    err = assert_error(r, status, code)
    assert "secret" not in r.text  # an engine-dead reason may quote internals
    if status == 429:
        assert r.headers["retry-after"] == "3" and "capacity" in err["message"]
    http = TestClient(build_app(RaisingEngine(error, after_first=True), "tiny"), raise_server_exceptions=False)
    r = http.post(COMPLETIONS, json={"prompt": [1, 2], "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["error"]["code"] == code and "secret" not in r.text


def test_a_dead_engine_is_503_on_every_route():
    engine = RaisingEngine(RuntimeError())
    engine.errored = True
    http = TestClient(build_app(engine, "tiny"), raise_server_exceptions=False)
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("GET", "/metrics"),
                         ("GET", "/version"), ("POST", COMPLETIONS), ("POST", "/tokenize"), ("GET", "/nowhere")):
        r = http.request(method, path, json={"prompt": [1]} if method == "POST" else None)
        assert_error(r, 503, "engine_dead")
        assert r.headers["retry-after"]


# -- with a real engine on the tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama):
    from pagellm.engine.async_llm import AsyncLLM

    eng = AsyncLLM.from_config(EngineConfig(model=tiny_llama, skip_tokenizer_init=True, max_model_len=256,
                                            kv_cache_memory=4 << 20, max_num_seqs=1),
                               engine_process=False, quiet=True, admission=AdmissionLimits(max_waiting_seqs=0))
    yield eng
    eng.shutdown()


def _app(engine, **limits):
    return build_app(engine, "tiny", options=ServerOptions(limits=ServerLimits.for_context(256, **limits)))


def test_a_full_queue_is_429_and_the_next_request_after_it_succeeds(engine):
    async def main():
        transport = httpx.ASGITransport(app=_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            long = asyncio.ensure_future(client.post(COMPLETIONS, json={
                "prompt": [5] * 20, "max_tokens": 200, "ignore_eos": True, "temperature": 0}))
            while engine.get_stats() is None or engine.get_stats().num_running == 0:
                await asyncio.sleep(0.005)
            refused = await client.post(COMPLETIONS, json={"prompt": [6, 7], "max_tokens": 2})
            assert (await long).status_code == 200
            after = await client.post(COMPLETIONS, json={"prompt": [6, 7], "max_tokens": 2})
        return refused, after

    refused, after = asyncio.run(main())
    assert_error(refused, 429, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    assert after.status_code == 200, after.text
    metrics = TestClient(_app(engine)).get("/metrics").text
    assert 'pagellm:request_rejected_total{model_name=' in metrics and 'reason="queue_full"} 1.0' in metrics


def test_request_timeout_is_504_and_frees_the_request(engine):
    http = TestClient(_app(engine, request_timeout_s=0.05), raise_server_exceptions=False)
    body = {"prompt": [5] * 20, "max_tokens": 200, "ignore_eos": True}
    assert_error(http.post(COMPLETIONS, json=body), 504, "request_deadline_exceeded")
    r = http.post(COMPLETIONS, json={**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "request_deadline_exceeded"
    stats = asyncio.run(engine.wait_for_stats())
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_max_n_and_priority_are_checked(engine):
    http = TestClient(_app(engine, max_n=2), raise_server_exceptions=False)
    err = assert_error(http.post(COMPLETIONS, json={"prompt": [5, 6], "n": 3, "max_tokens": 1}), 400, "invalid_value")
    assert err["param"] == "n" and "--max-n" in err["message"]
    err = assert_error(http.post(COMPLETIONS, json={"prompt": [5, 6], "priority": 1, "max_tokens": 1}), 400,
                       "invalid_value")
    assert "--scheduling-policy priority" in err["message"]
    assert_error(http.post(COMPLETIONS, json={"prompt": [5, 6], "priority": True}), 400, "invalid_value")
    assert http.post(COMPLETIONS, json={"prompt": [5, 6], "priority": 0, "max_tokens": 1}).status_code == 200
    # n=2 could never be admitted by this engine (1 running + 0 waiting): 400, not a 429 to retry forever.
    err = assert_error(http.post(COMPLETIONS, json={"prompt": [5, 6], "n": 2, "max_tokens": 1}), 400, "invalid_value")
    assert "ever queues" in err["message"]


# -- pagellm serve when its engine core dies ---------------------------------------------------------------------
def _core_pid(server_pid: int) -> int:
    cores = [p for p in psutil.Process(server_pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(cores) == 1, cores
    return cores[0].pid


@pytest.mark.parametrize("restart", [False, True])
def test_serve_exits_non_zero_or_restarts_when_the_engine_core_dies(tiny_llama, restart):
    from pagellm.benchmarks.server_process import ServerProcess

    args = [tiny_llama, "--skip-tokenizer-init", "--max-model-len", "256", "--kv-cache-memory", str(4 << 20),
            "--disable-uvicorn-access-log"] + (["--restart-engine-on-failure"] if restart else [])
    proc = ServerProcess(args).start()
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 4}
        assert httpx.post(proc.url + COMPLETIONS, json=body, timeout=60).status_code == 200
        old_core = _core_pid(proc.proc.pid)
        os.kill(old_core, signal.SIGKILL)
        if not restart:
            started = time.monotonic()
            assert proc.proc.wait(30) == 1, proc.log()
            elapsed = time.monotonic() - started
            print(f"the server exited {elapsed:.2f} s after its engine core was killed")
            assert elapsed < 15 and "engine core died" in proc.log()
            return
        deadline = time.monotonic() + 120
        # /health answers 200 until the death is noticed, then 503 engine_dead while a new core loads:
        # wait for a new core and health together, or the first 200 can come before the death is seen.
        while time.monotonic() < deadline:
            try:
                cores = [p.pid for p in psutil.Process(proc.proc.pid).children()
                         if "resource_tracker" not in " ".join(p.cmdline())]
                if cores and old_core not in cores and httpx.get(proc.url + "/health", timeout=2).status_code == 200:
                    break
            except (httpx.HTTPError, psutil.Error):
                pass
            time.sleep(0.2)
        assert httpx.post(proc.url + COMPLETIONS, json=body, timeout=60).status_code == 200, proc.log()
        assert _core_pid(proc.proc.pid) != old_core and proc.proc.poll() is None
        assert "pagellm:engine_restarts_total" in httpx.get(proc.url + "/metrics").text
    finally:
        proc.stop()
        proc.close()


@dataclass(frozen=True)
class RecordingLimits(AdmissionLimits):
    """The server's limits, noting how many sequences were in flight at each admission decision."""

    decisions: list = field(default_factory=list)

    def check(self, num_in_flight: int, num_new: int, max_num_seqs: int) -> None:
        try:
            super().check(num_in_flight, num_new, max_num_seqs)
        except EngineOverloadedError:
            self.decisions.append(("refused", num_in_flight))
            raise
        self.decisions.append(("admitted", num_in_flight))


def test_a_burst_is_bounded_by_the_default_queue(tiny_llama):
    """The table's burst (1,000 requests at max-num-seqs 4), scaled to 400 to stay quick: with the
    default limit (256 waiting) a request that finds 4 + 256 in flight gets 429 at once, every other
    is queued and completes, and nothing is left queued. (How many get 429 depends on how many
    finish while the burst arrives, which frees room: the bound is checked per decision.)"""
    from pagellm.engine.async_llm import AsyncLLM
    from pagellm.entrypoints.openai.server import admission_limits

    args = SimpleNamespace(max_waiting_requests=None)
    limits = RecordingLimits(max_waiting_seqs=admission_limits(args, 4).max_waiting_seqs)
    assert limits.max_waiting_seqs == 256
    eng = AsyncLLM.from_config(EngineConfig(model=tiny_llama, skip_tokenizer_init=True, max_model_len=256,
                                            kv_cache_memory=4 << 20, max_num_seqs=4),
                               engine_process=False, quiet=True, admission=limits)

    async def main():
        transport = httpx.ASGITransport(app=build_app(eng, "tiny"))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=120) as client:
            body = {"prompt": [5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True}
            return await asyncio.gather(*(client.post(COMPLETIONS, json=body) for _ in range(400)))

    try:
        statuses = [r.status_code for r in asyncio.run(main())]
        stats = asyncio.run(eng.wait_for_stats())
    finally:
        eng.shutdown()
    assert set(statuses) <= {200, 429} and len(limits.decisions) == 400
    refused = [n for what, n in limits.decisions if what == "refused"]
    admitted = [n for what, n in limits.decisions if what == "admitted"]
    assert statuses.count(429) == len(refused) > 0 and statuses.count(200) == len(admitted)
    assert set(refused) == {4 + 256} and max(admitted) == 4 + 256 - 1  # refused only when full; filled to the limit
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
