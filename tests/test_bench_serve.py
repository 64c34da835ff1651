"""`pagellm bench serve` against a real `pagellm serve` (SmolLM2) for a few short requests:
completions with token-id prompts, chat with text prompts, a two-rate sweep with its plot."""

from __future__ import annotations

import glob
import json
import os

import pytest

from pagellm.benchmarks.server_process import ServerProcess
from pagellm.entrypoints.cli import main

pytestmark = pytest.mark.slow

NAME = "smollm-bench"


@pytest.fixture(scope="module")
def server(smollm_path):
    proc = ServerProcess([smollm_path, "--served-model-name", NAME, "--kv-cache-memory", str(32 << 20),
                          "--max-model-len", "256", "--disable-uvicorn-access-log"])
    try:
        yield proc.start()
    finally:
        proc.close()


def _results(result_dir: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(result_dir, "serve-*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def _bench(server, result_dir, *extra: str) -> int:
    return main(["bench", "serve", "--base-url", server.url, "--model", NAME, "--num-prompts", "4",
                 "--input-len", "16", "--output-len", "8", "--result-dir", result_dir, "--disable-tqdm",
                 "--num-warmups", "1", *extra])


def test_completions_with_token_ids(server, tmp_path):
    out_dir = str(tmp_path)
    assert _bench(server, out_dir, "--prompt-format", "ids", "--max-concurrency", "2", "--save-traces") == 0
    (res,) = _results(out_dir)
    s = res["results"]["summary"]
    assert (s["completed"], s["failed"]) == (4, 0) and s["usage_reported"]
    assert s["total_input_tokens"] == 4 * 16 and s["total_output_tokens"] == 4 * 8  # exact: ids + ignore_eos
    assert 0 < s["ttft_ms"]["median"] <= s["e2el_ms"]["median"]
    assert s["tpot_ms"]["mean"] > 0 and s["itl_ms"]["mean"] > 0
    assert s["output_throughput"] == pytest.approx(32 / s["duration_s"])
    traces = res["results"]["traces"]
    assert all(len(t["chunk_times"]) >= 2 and t["output_tokens"] == 8 for t in traces)
    # never more than 2 requests in flight
    events = sorted([(t["send_time"], 1) for t in traces] + [(t["end_time"], -1) for t in traces])
    in_flight, peak = 0, 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    assert peak <= 2
    assert res["config"]["max_concurrency"] == 2 and res["environment"]["versions"]["httpx"]


def test_chat_text_sweep_draws_a_plot(server, tmp_path):
    out_dir = str(tmp_path)
    assert _bench(server, out_dir, "--endpoint", "chat", "--sweep-rates", "50,inf", "--label", "pagellm") == 0
    results = _results(out_dir)
    assert sorted(r["config"]["request_rate"] for r in results) == ["50", "inf"]
    for r in results:
        s = r["results"]["summary"]
        assert s["completed"] == 4 and s["total_output_tokens"] == 32 and s["total_input_tokens"] > 4 * 16
        assert "traces" not in r["results"]
    png = os.path.join(out_dir, "serve-sweep.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_failed_requests_are_counted_not_raised(server):
    from pagellm.benchmarks.datasets import SampleRequest
    from pagellm.benchmarks.serve import ServeConfig, benchmark

    # the server rejects an unknown sampling field: every request fails with a 400
    cfg = ServeConfig(base_url=server.base_url, model=NAME, prompt_format="ids", extra_body={"no_such_field": 1})
    samples = [SampleRequest([300 + i, 400, 500], 4) for i in range(3)]
    with pytest.raises(RuntimeError, match="warm-up request failed: .*HTTP 400"):
        benchmark(cfg, samples, warmup=1, show_progress=False)
    s = benchmark(cfg, samples, warmup=0, show_progress=False)["summary"]
    assert (s["completed"], s["failed"]) == (0, 3) and "HTTP 400" in s["errors"][0]
