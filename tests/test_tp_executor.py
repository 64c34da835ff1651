"""The mp executor: tensor-parallel ranks in spawned processes give the single-process tokens."""

from __future__ import annotations

import gc
import os
import signal
import time

import psutil
import pytest

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from tests.conftest import make_tiny_llama

PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 1, 8, 64, 33, 2, 19, 200, 77, 4, 6] * 3, [1, 2, 3], [9, 8, 7, 6, 5, 4, 3],
           [40, 41, 42, 43] * 5]
# 40 blocks of 16 KV slots at float32 for the 4-head/2-KV-head model (2 layers, head_dim 16): the
# prompts and their 24 new tokens need more, so the scheduler preempts.
KW = dict(skip_tokenizer_init=True, max_model_len=128, block_size=16, max_num_batched_tokens=32, enable_chunked_prefill=True,
          enable_prefix_caching=False, cpu_weight_prepack=False)


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp-gqa")), seed=7, num_kv_heads=2, heads=4)


def _kv_memory(tp: int) -> int:
    # Per rank: the rank's KV-head shard, so the same block count at every tp.
    per_token = 2 * 2 * 2 * 16 * 4 // min(tp, 2)
    return 10 * 16 * per_token


def _generate(path: str, tp: int) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, tensor_parallel_size=tp, kv_cache_memory=_kv_memory(tp), **KW)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], llm


def _children() -> list[psutil.Process]:
    # multiprocessing's resource tracker (started with the first spawn) lives as long as this process.
    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != "zombie" and "resource_tracker" not in " ".join(c.cmdline())]


@pytest.fixture(scope="module")
def tp1_tokens(gqa_llama) -> list[list[int]]:
    ref, llm1 = _generate(gqa_llama, 1)
    core1 = llm1.llm_engine.core
    assert core1.num_free_blocks == core1.num_blocks
    return ref


def test_tp2_matches_tp1_a_killed_rank_fails_fast_and_nothing_is_left(gqa_llama, tp1_tokens):
    before = {c.pid for c in _children()}
    got, llm2 = _generate(gqa_llama, 2)
    assert got == tp1_tokens
    core2 = llm2.llm_engine.core
    assert core2.num_blocks == 10 and core2.num_free_blocks == core2.num_blocks
    pids = core2.executor.rank_pids()
    assert len(pids) == 2
    # A rank killed between steps: the next step fails within seconds, naming the rank.
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(Exception, match="rank"):
        llm2.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=4, temperature=0.0))
    assert time.monotonic() - start < 10
    # Dropping the engine stops the surviving rank too.
    del llm2, core2
    gc.collect()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        assert time.monotonic() < deadline, "tensor-parallel ranks outlived the LLM"
        time.sleep(0.1)
    assert {c.pid for c in _children()} <= before


def test_bad_layout_fails_at_start_up(gqa_llama):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*tensor_parallel_size \(3\)"):
        LLM(gqa_llama, tensor_parallel_size=3, kv_cache_memory=_kv_memory(2), **KW)


def test_config_validation():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(distributed_executor_backend="slurm")
    with pytest.raises(ValueError, match="'uni' runs one worker"):
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="uni")
    assert EngineConfig(tensor_parallel_size=2).executor_backend() == "mp"
    assert EngineConfig().executor_backend() == "uni"


def test_tp4_replicated_kv_heads_match_tp1(gqa_llama, tp1_tokens):
    # 2 KV heads on 4 ranks: each KV head is held by two ranks.
    got, llm4 = _generate(gqa_llama, 4)
    assert got == tp1_tokens
    core = llm4.llm_engine.core
    assert core.num_free_blocks == core.num_blocks
    core.executor.shutdown()


def test_mixtral_expert_parallel_matches_tp1(tmp_path):
    from pagellm.entrypoints.cli import build_parser
    from tests.test_models import make_tiny

    path = make_tiny(str(tmp_path / "mixtral"), "mixtral")[0]  # 4 experts, top 2
    kw = dict(KW, kv_cache_memory=1 << 22)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[1:3]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, params)]
    # Experts sharded by tp (no expert parallelism) are checked in process by test_tensor_parallel.py.
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=True, **kw)
    executor = llm.llm_engine.core.executor
    assert [r["expert_parallel"] for r in executor.collective_rpc("parallel_layout")] == [True, True]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
    executor.shutdown()
    args = build_parser().parse_args(["serve", "m", "--enable-expert-parallel"])
    assert args.enable_expert_parallel is True



def test_qwen3_tp2_matches_tp1(tmp_path):
    # Qwen3's per-head q/k norms run on each rank's own heads.
    from tests.test_models import make_tiny

    path = make_tiny(str(tmp_path / "qwen3"), "qwen3")[0]
    kw = dict(KW, kv_cache_memory=1 << 20)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
        assert llm.llm_engine.core.num_free_blocks == llm.llm_engine.core.num_blocks
    finally:
        llm.llm_engine.core.executor.shutdown()
