"""The Ray executor: ranks as Ray actors in a placement group give the single-process greedy tokens.

One Ray "cluster" for the module: two nodes of 2 CPUs each on this machine (ray.cluster_utils), so
placement across nodes is real Ray scheduling while the test stays local."""

from __future__ import annotations

import gc
import os
import signal
import time

import psutil
import pytest

import ray
from ray.cluster_utils import Cluster
from ray.util import placement_group_table

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.executor import RankFailure
from tests.conftest import make_tiny_llama

PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 1, 8, 64, 33, 2, 19, 200, 77, 4, 6] * 3, [1, 2, 3], [9, 8, 7, 6, 5, 4, 3],
           [40, 41, 42, 43] * 5]
KW = dict(skip_tokenizer_init=True, max_model_len=128, block_size=16, max_num_batched_tokens=32,
          enable_chunked_prefill=True, enable_prefix_caching=False, cpu_weight_prepack=False,
          kv_cache_memory=1 << 20)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(autouse=True)
def one_cpu_per_rank(monkeypatch):
    monkeypatch.setenv("PAGELLM_RAY_CPUS_PER_RANK", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    # 3 layers: pp 2 splits them 2 + 1.
    return make_tiny_llama(str(tmp_path_factory.mktemp("ray-llama")), seed=7, num_kv_heads=2, heads=4, layers=3)


@pytest.fixture(scope="module")
def reference(llama) -> list[list[int]]:
    return _generate(LLM(llama, **KW))


def _generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


def _alive(pids: list[int]) -> bool:
    return any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def _assert_released(pids: list[int]) -> None:
    """No actor process, no live placement group, every CPU free again (within a few seconds)."""
    deadline = time.monotonic() + 10
    while (_alive(pids) or ray.available_resources().get("CPU", 0) < 2 * NODE_CPUS
           or any(g["state"] != "REMOVED" for g in placement_group_table().values())):
        assert time.monotonic() < deadline, (f"left behind: pids alive {_alive(pids)}, available "
                                             f"{ray.available_resources()}, groups {placement_group_table()}")
        time.sleep(0.1)


def test_tp2_across_two_nodes_matches_uni_then_killed_rank_fails_fast(cluster, llama, reference, monkeypatch):
    # One executor for both checks: a rank's start (torch and the model in a fresh process) dominates.
    monkeypatch.setenv("PAGELLM_RAY_PLACEMENT_STRATEGY", "STRICT_SPREAD")  # one rank per node
    llm = LLM(llama, tensor_parallel_size=2, distributed_executor_backend="ray", **KW)
    executor = llm.llm_engine.core.executor
    assert type(executor).__name__ == "RayExecutor"
    nodes = executor.rank_nodes()
    assert len(set(nodes)) == 2, nodes
    assert _generate(llm) == reference
    pids = executor.rank_pids()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 of 2 .* died"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    assert time.monotonic() - start < 5
    with pytest.raises(RankFailure):  # and every later call
        executor.collective_rpc("kv_bytes_per_token")
    executor.shutdown()
    _assert_released(pids)


def test_tp2_pp2_over_both_nodes_matches_uni_then_ray_kill_fails_and_gc_releases(cluster, llama, reference):
    # 4 ranks of 1 CPU on 2 nodes of 2 CPUs: PACK (the default) has to fill both nodes.
    llm = LLM(llama, tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray", **KW)
    executor = llm.llm_engine.core.executor
    assert executor.max_concurrent_batches == 2 and executor.output_rank == 2
    nodes = executor.rank_nodes()
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2], nodes
    assert _generate(llm) == reference
    pids = executor.rank_pids()
    ray.kill(executor._held.actors[2])  # the last stage's tp rank 0, through Ray this time
    with pytest.raises(RankFailure, match="rank 2 of 4 .* died"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    del llm, executor
    gc.collect()
    _assert_released(pids)


def test_layout_bigger_than_cluster_fails_clearly(cluster, llama, monkeypatch):
    monkeypatch.setenv("PAGELLM_RAY_CPUS_PER_RANK", "2")
    monkeypatch.setenv("PAGELLM_RAY_PLACEMENT_TIMEOUT_S", "1.5")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tp=4 x pp=1.*4 bundles of \{'CPU': 2\}.*4 CPU on 2 node"):
        LLM(llama, tensor_parallel_size=4, distributed_executor_backend="ray", **KW)
    assert time.monotonic() - start < 10
    _assert_released([])


def test_config_and_cli_accept_ray():
    from pagellm.entrypoints.cli import build_parser, engine_kwargs

    assert EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray").executor_backend() == "ray"
    assert EngineConfig(tensor_parallel_size=2).executor_backend() == "mp"  # auto never picks ray
    args = build_parser().parse_args(["serve", "m", "-tp", "2", "--distributed-executor-backend", "ray"])
    assert engine_kwargs(args)["distributed_executor_backend"] == "ray"
    with pytest.raises(ValueError, match="PAGELLM_RAY_PLACEMENT_STRATEGY"):
        from pagellm.executor.ray_placement import placement_settings
        placement_settings({"PAGELLM_RAY_PLACEMENT_STRATEGY": "ANYWHERE"})
