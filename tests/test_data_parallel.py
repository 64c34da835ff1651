"""Data parallelism end to end on the tiny random Llama: AsyncLLM with two engine core processes
gives the one-core greedy tokens, both cores get work (per-core `engine` metrics), a shared prefix
stays on one core (its prefix cache serves it), and a killed core fails its group fast: in-flight
requests error out, /health is 503, no process is left behind. Plus the config checks."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.async_llm import AsyncLLM
from pagellm.engine.dp_client import DPCoreClient
from pagellm.engine.exceptions import EngineDeadError
from pagellm.entrypoints.cli import build_parser
from pagellm.entrypoints.openai.server import build_app

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Distinct first blocks (block_size 16), so prefix affinity leaves them to least-load routing.
PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(18 + i)] for i in range(8)]


def _config(model: str, **kw) -> EngineConfig:
    return EngineConfig(model=model, skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=2 << 20, **kw)


def test_data_parallel_config_is_checked(tiny_llama):
    with pytest.raises(ValueError, match=r"EngineConfig.data_parallel_size: must be a positive integer, got 0"):
        EngineConfig(data_parallel_size=0)
    config = EngineConfig(data_parallel_size=2, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert (config.world_size, config.total_world_size) == (4, 8)  # per core, and all cores together
    with pytest.raises(ValueError, match=r"2 engine cores x 4 ranks each .* = 8 devices, more than the 6 CUDA"):
        EngineConfig(device="cuda", data_parallel_size=2, tensor_parallel_size=4).resolve(
            model_max_len=256, cuda_available=True, cuda_device_count=6)
    with pytest.raises(ValueError, match=r"offline LLM runs one engine core.*pagellm serve MODEL -dp 2"):
        LLM(tiny_llama, data_parallel_size=2, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="engine_process=False"):
        AsyncLLM.from_config(_config(tiny_llama, data_parallel_size=2), engine_process=False)
    args = build_parser().parse_args(["serve", tiny_llama, "-dp", "2", "-tp", "2"])
    assert (args.data_parallel_size, args.tensor_parallel_size) == (2, 2)
    assert build_parser().parse_args(["serve", tiny_llama, "--data-parallel-size", "3"]).data_parallel_size == 3


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = LLM(tiny_llama, skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=2 << 20, quiet=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                          use_tqdm=False)]


@pytest.fixture(scope="module")
def dp_engine(tiny_llama):
    """Two engine cores; the last test of this module kills one, so the others run first."""
    eng = AsyncLLM.from_config(_config(tiny_llama, data_parallel_size=2), quiet=True)
    yield eng
    eng.shutdown()


async def _tokens(engine, prompt, request_id, params=GREEDY):
    ids, last = [], None
    async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id):
        ids += out.outputs[0].token_ids
        last = out
    return ids, last


def _per_engine(engine, name: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(engine.metrics.render().decode()):
        for s in family.samples:
            if s.name == name:
                out[s.labels["engine"]] = s.value
    return out


def test_two_cores_give_the_one_core_tokens_and_share_the_work(dp_engine, reference):
    assert isinstance(dp_engine._client, DPCoreClient)

    async def main():
        return await asyncio.gather(*(_tokens(dp_engine, p, f"r{i}") for i, p in enumerate(PROMPTS)))

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert [ids for ids, _ in results] == reference
    queries = _per_engine(dp_engine, "pagellm:prefix_cache_queries_total")
    assert set(queries) == {"0", "1"}
    # Every admitted prompt is looked up in its core's prefix cache: both cores got prompts, and all of them.
    assert queries["0"] > 0 and queries["1"] > 0
    assert queries["0"] + queries["1"] == sum(len(p) for p in PROMPTS)
    assert set(_per_engine(dp_engine, "pagellm:num_requests_running")) == {"0", "1"}
    stats = asyncio.run(dp_engine.wait_for_stats())  # both cores' snapshots, combined
    assert (stats.num_running, stats.num_waiting, stats.prefix_cache_queries) == (0, 0, sum(queries.values()))


async def _routed(router, request_id: str) -> int:
    """The core a request was sent to, once it has been (it is tokenized off the loop first)."""
    while router.owner(request_id) is None:
        await asyncio.sleep(0.002)
    return router.owner(request_id)


def test_a_shared_prefix_goes_to_the_core_that_cached_it(dp_engine):
    system = [11] * 32  # two full blocks
    n2 = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=2)
    router = dp_engine._client.router

    async def main():
        # A long request holds the prefix on one core, so plain least load would pick the other one.
        first = asyncio.ensure_future(_tokens(dp_engine, system + [5, 6], "sys-1",
                                              SamplingParams(max_tokens=100, ignore_eos=True)))
        while (await dp_engine.wait_for_stats()).num_running == 0:
            await asyncio.sleep(0.01)
        owner = router.owner("sys-1")
        second = asyncio.ensure_future(_tokens(dp_engine, system + [7], "sys-2", n2))
        assert await _routed(router, "sys-2") == owner
        # Another cache salt shares nothing: least load sends it to the idle core.
        salted = asyncio.ensure_future(dp_engine.generate(
            {"prompt_token_ids": system + [7], "cache_salt": "other"}, GREEDY, "salted").__anext__())
        assert await _routed(router, "salted") == 1 - owner
        return (await first)[1], (await second)[1], await salted

    first, second, salted = asyncio.run(asyncio.wait_for(main(), 60))
    assert first.num_cached_tokens == 0 and salted.num_cached_tokens == 0
    assert second.num_cached_tokens == 32  # found in the first one's core
    assert sorted(c.index for c in second.outputs) == [0, 1]  # both samples of n=2, on that core


def test_a_killed_core_fails_its_group_fast_and_leaves_nothing(dp_engine):
    pids = dp_engine._client.pids
    dead = []
    dp_engine.add_dead_callback(dead.append)

    async def main():
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        streams = [dp_engine.generate({"prompt_token_ids": p}, params, f"long-{i}") for i, p in enumerate(PROMPTS[:2])]
        for stream in streams:
            await anext(stream)
        assert all(len(c.pending) == 0 and c.num_running == 1 for c in dp_engine._client.router.cores)
        psutil.Process(pids[1]).kill()
        started = time.monotonic()
        for stream in streams:  # each must end with an error, not hang
            with pytest.raises(EngineDeadError, match="data-parallel engine core 1 of 2"):
                async for _ in stream:
                    pass
        elapsed = time.monotonic() - started
        with pytest.raises(EngineDeadError):
            await anext(dp_engine.generate({"prompt_token_ids": [5, 6]}, GREEDY, "after"))
        with pytest.raises(EngineDeadError):
            await dp_engine.wait_for_stats()
        return elapsed

    elapsed = asyncio.run(asyncio.wait_for(main(), 30))
    deadline = time.monotonic() + 10  # the dead callback runs on the reader thread, after the streams fail
    while not dead and time.monotonic() < deadline:
        time.sleep(0.01)
    assert elapsed < 10 and dp_engine.errored and len(dead) == 1 and "core 1 of 2" in dead[0]
    assert TestClient(build_app(dp_engine, "tiny"), raise_server_exceptions=False).get("/health").status_code == 503
    dp_engine.shutdown()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
