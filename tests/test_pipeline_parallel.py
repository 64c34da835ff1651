"""Pipeline parallelism: stages in spawned processes (gloo) give the single-process greedy tokens.

One LLM per layout; the prompts need more KV blocks than the pool holds (preemption) and are
longer than the step budget (chunked prefill)."""

from __future__ import annotations

import gc
import os
import random
import signal
import time
from collections import deque

import psutil
import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler import Scheduler
from pagellm.distributed.parallel_state import ParallelContext, set_parallel_context
from pagellm.distributed.pipeline import MissingLayer, stage_layer_counts, stage_layer_range
from tests.conftest import make_tiny_llama
from pagellm.request import Request
from tests.test_gemma3 import make_tiny_gemma3
from tests.test_scheduler import EOS, assert_all_freed, next_token, reference

PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 1, 8, 64, 33, 2, 19, 200, 77, 4, 6] * 3, [1, 2, 3], [9, 8, 7, 6, 5, 4, 3],
           [40, 41, 42, 43] * 5]
MAX_TOKENS = 24
KW = dict(skip_tokenizer_init=True, max_model_len=128, block_size=16, max_num_batched_tokens=32,
          enable_chunked_prefill=True, enable_prefix_caching=False, cpu_weight_prepack=False)
BLOCKS = 10  # the prompts and their new tokens need 12 blocks of 16: the scheduler preempts


def _kv_memory(layers_per_rank: int, kv_heads_per_rank: int) -> int:
    """A per-rank KV budget of BLOCKS blocks on the rank with the most layers (fp32, head_dim 16)."""
    return BLOCKS * 16 * 2 * layers_per_rank * kv_heads_per_rank * 16 * 4


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> str:
    # 3 layers: the stages get 2 and 1 (an uneven split); tied embeddings, so the last stage holds
    # its own copy of the embedding for the LM head.
    return make_tiny_llama(str(tmp_path_factory.mktemp("pp-llama")), seed=7, num_kv_heads=2, heads=4, layers=3)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# Seeds and a penalty: state only the sampling (last) stage's runner holds.
SEEDED = SamplingParams(max_tokens=8, temperature=1.0, seed=11, repetition_penalty=1.5, ignore_eos=True)


def _generate(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [o.outputs[0].token_ids for o in outs]


def _reference(path: str, kv_memory: int, params: SamplingParams = GREEDY):
    llm = LLM(path, kv_cache_memory=kv_memory, **KW)
    assert llm.llm_engine.core.num_blocks == BLOCKS
    tokens = _generate(llm, params)
    if params is not GREEDY:
        tokens = (_generate(llm), tokens)
    del llm
    gc.collect()
    return tokens


def _children() -> list[psutil.Process]:
    # multiprocessing's resource tracker (started with the first spawn) lives as long as this process.
    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != "zombie" and "resource_tracker" not in " ".join(c.cmdline())]


def _alive(pids: list[int]) -> bool:
    return any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def _assert_all_blocks_free(llm: LLM) -> None:
    core = llm.llm_engine.core
    assert core.num_blocks == BLOCKS
    assert core.num_free_blocks == core.num_blocks
    assert core.scheduler.num_preemptions_total > 0, "the test should exercise preemption"


def _assert_kill_fails_fast(llm: LLM, rank: int) -> None:
    executor = llm.llm_engine.core.executor
    os.kill(executor.rank_pids()[rank], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(Exception, match="rank"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=4, temperature=0.0))
    assert time.monotonic() - start < 10
    executor.shutdown()
    assert not _alive(executor.rank_pids())


def test_pp2_matches_single_process_and_leaves_nothing(llama3):
    ref, ref_seeded = _reference(llama3, _kv_memory(3, 2), SEEDED)
    assert ref_seeded != [t[:8] for t in ref]  # the seeded run really samples
    before = {c.pid for c in _children()}
    llm = LLM(llama3, pipeline_parallel_size=2, kv_cache_memory=_kv_memory(2, 2), **KW)
    core = llm.llm_engine.core
    depths = []  # batches already in flight when one more is started
    start_step = core.executor.execute_async
    core.executor.execute_async = lambda sched: (depths.append(len(core._batch_queue)), start_step(sched))[1]
    assert _generate(llm) == ref
    del core.executor.execute_async, start_step  # the wrapper holds the executor
    assert max(depths) == 1, "two batches should have been in the pipeline at once"
    _assert_all_blocks_free(llm)
    assert _generate(llm, SEEDED) == ref_seeded
    # Per rank: the stage's layers only (2 and 1), so a token costs what one process's does.
    assert core.executor.collective_rpc("kv_bytes_per_token") == [2 * 2 * 2 * 16 * 4, 1 * 2 * 2 * 16 * 4]
    pids = core.executor.rank_pids()
    assert len(pids) == 2
    del llm, core
    gc.collect()
    deadline = time.monotonic() + 10
    while _alive(pids):
        assert time.monotonic() < deadline, "pipeline ranks outlived the LLM"
        time.sleep(0.1)
    assert {c.pid for c in _children()} <= before


def test_tp2_pp2_matches_single_process_and_a_killed_last_stage_rank_fails_fast(llama3):
    ref = _reference(llama3, _kv_memory(3, 2))
    llm = LLM(llama3, tensor_parallel_size=2, pipeline_parallel_size=2, kv_cache_memory=_kv_memory(2, 1), **KW)
    assert _generate(llm) == ref
    _assert_all_blocks_free(llm)
    assert llm.llm_engine.core.executor.output_rank == 2  # tp rank 0 of the last stage
    _assert_kill_fails_fast(llm, rank=3)


def test_pp3_a_middle_stage_receives_and_sends(llama3):
    ref = _reference(llama3, _kv_memory(3, 2))
    llm = LLM(llama3, pipeline_parallel_size=3, kv_cache_memory=_kv_memory(1, 2), **KW)
    assert _generate(llm) == ref
    _assert_all_blocks_free(llm)
    assert llm.llm_engine.core.executor.output_rank == 2
    llm.llm_engine.core.executor.shutdown()


def test_gemma3_pp2_matches_single_process_and_a_killed_first_stage_rank_fails_fast(tmp_path):
    path = make_tiny_gemma3(str(tmp_path / "gemma"), seed=5)
    ref = _reference(path, _kv_memory(4, 2))
    llm = LLM(path, pipeline_parallel_size=2, kv_cache_memory=_kv_memory(2, 2), **KW)
    assert _generate(llm) == ref
    _assert_all_blocks_free(llm)
    _assert_kill_fails_fast(llm, rank=0)


def test_more_stages_than_layers_fails_at_start_up(llama3):
    before = {c.pid for c in _children()}
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(4\).*num_hidden_layers \(3\)"):
        LLM(llama3, pipeline_parallel_size=4, kv_cache_memory=_kv_memory(1, 2), **KW)
    assert {c.pid for c in _children()} <= before  # refused before any rank started


def test_config_accepts_pipeline_parallelism():
    from pagellm.config import EngineConfig

    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert config.world_size == 4 and config.executor_backend() == "mp"
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="'uni' runs one worker"):
        EngineConfig(pipeline_parallel_size=2, distributed_executor_backend="uni")


def test_stage_layer_split():
    assert stage_layer_counts(4, 2) == [2, 2]
    assert stage_layer_counts(3, 2) == [2, 1]  # the remainder goes before the last stage
    assert stage_layer_counts(7, 3) == [2, 3, 2]
    assert stage_layer_counts(8, 3) == [3, 3, 2]
    assert stage_layer_counts(5, 1) == [5]
    assert [stage_layer_range(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 8), (8, 10)]
    for layers in range(1, 12):
        for pp in range(1, layers + 1):
            counts = stage_layer_counts(layers, pp)
            assert sum(counts) == layers and max(counts) - min(counts) <= 1 and min(counts) >= 1
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\).*num_hidden_layers \(2\)"):
        stage_layer_counts(2, 3)


def test_stage_builds_and_loads_only_its_part(llama3):
    """The last of two stages: layers 2.. only, the final norm, and a tied LM head holding its own
    copy of the checkpoint's embedding; no embedding, no KV layers of the first stage."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from pagellm.attention.layer import Attention
    from pagellm.models.llama import LlamaForCausalLM

    config = AutoConfig.from_pretrained(llama3)
    tensors = load_file(os.path.join(llama3, "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: only the embedding is stored
    with set_parallel_context(ParallelContext(pp_rank=1, pp_size=2, pp_group=object(), rank=1, world_size=2)):
        model = LlamaForCausalLM(config, 128)
    model.load_weights(tensors.items())
    assert isinstance(model.model.embed_tokens, MissingLayer)
    assert [isinstance(layer, MissingLayer) for layer in model.model.layers] == [True, True, False]
    assert sum(isinstance(m, Attention) for m in model.modules()) == 1
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, tensors["model.layers.2.mlp.down_proj.weight"])
    with set_parallel_context(ParallelContext(pp_rank=0, pp_size=2, pp_group=object(), rank=0, world_size=2)):
        first = LlamaForCausalLM(config, 128)
    first.load_weights(tensors.items())
    assert isinstance(first.lm_head, MissingLayer) and isinstance(first.model.norm, MissingLayer)
    assert [isinstance(layer, MissingLayer) for layer in first.model.layers] == [False, False, True]


def test_scheduler_with_batches_in_flight_matches_the_reference():
    """The scheduler under a two-deep batch queue (no model): in-flight requests are neither
    rescheduled nor preempted, a stage that does not sample rebuilds every request's tokens from
    the SchedulerOutputs alone, and each request's tokens are what it gives alone."""
    rng = random.Random(3)
    kv = KVCacheManager(20, 4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=96, enable_chunked_prefill=True,
                      pipeline_parallel=True)
    prompts = {f"r{i}": [rng.randrange(10, 60) for _ in range(rng.randrange(3, 30))] for i in range(8)}
    params = SamplingParams(max_tokens=12)
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, params, eos_token_ids={EOS}))
    stage0: dict[str, tuple[list[int], list[int]]] = {}  # (prompt, outputs) as a non-sampling stage knows them
    queue: deque = deque()
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    finish: dict[str, str] = {}
    max_depth = 0
    while sched.has_unfinished_requests() or queue:
        started = False
        if len(queue) < 2:
            out = sched.schedule()
            in_flight = {rid for queued, _ in queue for rid in queued.num_scheduled_tokens}
            assert not in_flight & set(out.num_scheduled_tokens), "a request in flight was scheduled again"
            assert not in_flight & out.preempted_req_ids, "a request in flight was preempted"
            for rid in out.finished_req_ids | out.preempted_req_ids:
                stage0.pop(rid, None)
            for new in out.scheduled_new_reqs:
                stage0[new.req_id] = (list(new.prompt_token_ids), list(new.output_token_ids))
            for cached in out.scheduled_cached_reqs:
                known = stage0[cached.req_id][1]
                known[cached.num_output_tokens - len(cached.new_token_ids):] = cached.new_token_ids
            sampled = {}
            for rid, n in out.num_scheduled_tokens.items():
                request = sched.requests[rid]
                prompt, known = stage0[rid]
                assert prompt + known == request.prompt_token_ids + request.output_token_ids
                if request.num_computed_tokens + n == request.num_tokens:
                    sampled[rid] = [next_token(prompt + known)]  # the last stage samples
            if not out.is_empty or out.finished_req_ids:
                queue.append((out, sampled))
                started = not out.is_empty
            max_depth = max(max_depth, len(queue))
        if not queue or (started and len(queue) < 2):
            continue
        out, sampled = queue.popleft()
        for update in sched.update_from_output(out, sampled):
            outputs[update.req_id] += update.new_token_ids
            if update.finish_reason is not None:
                finish[update.req_id] = update.finish_reason
    assert max_depth == 2
    assert sched.num_preemptions_total > 0
    for rid, prompt in prompts.items():
        expected, reason, _ = reference(prompt, params, {EOS}, 96)
        assert (outputs[rid], finish[rid]) == (expected, reason), rid
    assert_all_freed(sched)


def test_batch_queue_keeps_tokens_and_isolates_a_failed_step(tiny_llama, monkeypatch):
    """The core's batch queue over the in-process executor (its futures are done at once, applied
    later): the same tokens as the synchronous loop, and a failing request still ends alone."""
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.executor.uniproc import UniprocExecutor
    from tests.test_engine_hardening import POISON, _config, _prompts, _run, poison_runner

    prompts = _prompts(6)
    small_pool = dict(kv_cache_memory=18 * 16 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=64)  # 18 blocks: preempts
    reference = {rid: c.token_ids for rid, c in _run(LLMEngine(_config(tiny_llama, **small_pool), quiet=True),
                                                     prompts).items()}
    monkeypatch.setattr(UniprocExecutor, "max_concurrent_batches", property(lambda self: 2))
    engine = LLMEngine(_config(tiny_llama, **small_pool), quiet=True)
    core = engine.core
    assert core._batch_queue is not None
    depths = []
    start_step = core.executor.execute_async
    core.executor.execute_async = lambda sched: (depths.append(len(core._batch_queue)), start_step(sched))[1]
    assert {rid: c.token_ids for rid, c in _run(engine, prompts).items()} == reference
    assert max(depths) == 1 and core.scheduler.num_preemptions_total > 0
    poison_runner(core.runner)
    done = _run(engine, prompts + [_prompts(1, seed=9)[0]], ids=[f"b{i}" for i in range(6)] + [POISON])
    assert done[POISON].finish_reason == "error" and done[POISON].token_ids == []
    assert [done[f"b{i}"].token_ids for i in range(6)] == [reference[str(i)] for i in range(6)]
    assert core.num_free_blocks == core.num_blocks and not core.has_unfinished_requests()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3_longrope_short", "mixtral"])
def test_every_family_loads_its_stages(tmp_path, arch):
    """Both stages of each Llama-like family load their part of a real checkpoint (every tensor
    they hold filled, every other stage's tensor skipped), and the two stages together hold every
    parameter of the single-process model with the checkpoint's values."""
    from pagellm.loader import iter_weights
    from pagellm.loader.hf import load_hf_config
    from pagellm.loader.source import ModelSource
    from pagellm.models.registry import get_model_class
    from tests.test_models import make_tiny

    path, _ = make_tiny(str(tmp_path / arch), arch)
    source = ModelSource(path=path, kind="hf")
    config = load_hf_config(source)
    model_cls = get_model_class(config)
    whole = model_cls(config, 128)
    whole.load_weights(iter_weights(source, torch.float32, "none"))
    expected = dict(whole.named_parameters())
    held: dict[str, torch.Tensor] = {}
    for rank in range(2):
        with set_parallel_context(ParallelContext(pp_rank=rank, pp_size=2, pp_group=object(), rank=rank,
                                                  world_size=2)):
            stage = model_cls(config, 128)
        stage.load_weights(iter_weights(source, torch.float32, "none"))
        held.update(stage.named_parameters())
    if "lm_head.weight" not in expected:  # tied: one parameter in one process, a copy on the last stage
        assert torch.equal(held.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert held.keys() == expected.keys()
    for name, param in held.items():
        assert torch.equal(param, expected[name]), name
