"""The executor/worker seam and the runner's persistent input batch.

- A UniprocExecutor built by hand drives an EngineCore to the same greedy tokens as the LLM
  front end; every ModelRunnerOutput it returns survives pickling; collective_rpc reaches the worker.
- An executor over several (fake) workers sizes the KV cache by the smallest of them.
- The input batch, driven by random scheduler diffs (new, cached, finished, preempted requests,
  ragged chunk lengths), lays out the same flat inputs as a plain Python reference, and keeps
  every row's block table right across removals and condensing.
- The persistent sampling metadata equals the one-shot build as outputs grow.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import fields

import pytest
import torch

from tests.conftest import make_tiny_llama
from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from pagellm.engine.core import EngineCore, EngineCoreRequest
from pagellm.engine.setup import resolve_setup
from pagellm.executor import Executor, UniprocExecutor
from pagellm.sample import SamplingMetadata, SamplingMetadataBuilder, SamplingRow
from pagellm.worker.input_batch import InputBatch
from pagellm.worker.kv_cache import kv_bytes_per_token
from pagellm.worker.outputs import ModelRunnerOutput

PROMPTS = [[(5 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([3, 17, 40, 9])]
ENGINE_ARGS = dict(skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=32, kv_cache_memory=4 << 20)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), seed=5)


def test_uniproc_executor_matches_the_engine_and_outputs_pickle(tiny_path):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    llm = LLM(tiny_path, quiet=True, **ENGINE_ARGS)
    expected = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                             use_tqdm=False)]
    del llm

    setup = resolve_setup(EngineConfig(model=tiny_path, **ENGINE_ARGS))
    executor = UniprocExecutor(setup)
    outputs: list[ModelRunnerOutput] = []
    execute = executor.execute

    def recording_execute(sched):
        out = execute(sched)
        outputs.append(out)
        return out

    executor.execute = recording_execute
    core = EngineCore(setup.config, setup.model_config, executor, quiet=True)
    assert core.runner is executor.driver_worker.model_runner
    for i, prompt in enumerate(PROMPTS):
        core.add_request(EngineCoreRequest(str(i), prompt, params))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while core.has_unfinished_requests():
        for update in core.step():
            tokens[update.req_id] += update.new_token_ids
    assert [tokens[str(i)] for i in range(len(PROMPTS))] == expected
    assert any(o.logprobs for o in outputs) and any(o.prompt_logprobs for o in outputs)
    for out in outputs:
        assert pickle.loads(pickle.dumps(out)) == out


def test_collective_rpc_reaches_the_worker(tiny_path):
    setup = resolve_setup(EngineConfig(model=tiny_path, **ENGINE_ARGS))
    executor = UniprocExecutor(setup)
    num_blocks = executor.initialize()
    assert executor.collective_rpc("kv_bytes_per_token") == [kv_bytes_per_token(setup.model_config, torch.float32)]
    assert executor.collective_rpc("determine_num_blocks") == [num_blocks]
    assert executor.driver_worker.model_runner.num_blocks == num_blocks
    assert executor.kv_cache_summary.startswith(f"KV cache: {num_blocks} blocks x 16 tokens")
    executor.shutdown()
    assert executor.driver_worker.kv_caches == []


class _FakeWorker:
    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.allocated = None

    def determine_num_blocks(self) -> int:
        return self.blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.allocated = num_blocks

    def kv_bytes_per_token(self) -> int:
        return 100

    def compile_or_warm_up_model(self) -> str:
        return ""


class _FakeExecutor(Executor):
    """Several workers behind one executor, as tensor/pipeline parallelism would have."""

    def __init__(self, config: EngineConfig, blocks: list[int]) -> None:
        super().__init__(config)
        self.workers = [_FakeWorker(b) for b in blocks]

    def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]

    def execute(self, sched):
        return ModelRunnerOutput({})


def test_executor_sizes_the_kv_cache_by_the_smallest_worker():
    config = EngineConfig(block_size=16, max_model_len=64)
    executor = _FakeExecutor(config, [10, 6, 8])
    assert executor.initialize() == 6
    assert [w.allocated for w in executor.workers] == [6, 6, 6]
    assert "(300 bytes/token" in executor.kv_cache_summary  # each worker holds its shard: 3 x 100
    with pytest.raises(ValueError, match="the KV cache holds 48 tokens, less than max_model_len"):
        _FakeExecutor(config, [10, 3]).initialize()


# -- the input batch ------------------------------------------------------------------------
BLOCK = 4


class _Ref:
    """A request as the reference sees it."""

    def __init__(self, req_id: str, prompt: list[int], computed: int, blocks: list[int]) -> None:
        self.req_id, self.prompt, self.output, self.computed, self.blocks = req_id, prompt, [], computed, blocks

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def _reference_inputs(order: list[_Ref], qlens: dict[str, int]):
    ids, pos, slots = [], [], []
    for r in order:
        for p in range(r.computed, r.computed + qlens[r.req_id]):
            ids.append(r.tokens[p])
            pos.append(p)
            slots.append(r.blocks[p // BLOCK] * BLOCK + p % BLOCK)
    width = max(max(len(r.blocks) for r in order), 1)
    table = [r.blocks + [0] * (width - len(r.blocks)) for r in order]
    qsl = [0]
    for r in order:
        qsl.append(qsl[-1] + qlens[r.req_id])
    samples = [i for i, r in enumerate(order) if r.computed + qlens[r.req_id] == len(r.tokens)]
    return ids, pos, slots, table, qsl, samples


def _check_rows(batch: InputBatch) -> None:
    live = sorted(batch.row_of.values())
    assert live == list(range(len(batch.requests))), "rows 0..n-1 are the live ones after condensing"
    for req_id, state in batch.requests.items():
        row = batch.row_of[req_id]
        assert batch.row_req[row] == req_id
        assert batch.num_blocks[row] == len(state.block_ids)
        assert batch.block_table[row, :len(state.block_ids)].tolist() == state.block_ids
        assert not batch.block_table[row, len(state.block_ids):].any()


@pytest.mark.parametrize("seed", range(4))
def test_input_batch_matches_a_python_reference(seed):
    rng = random.Random(seed)
    batch = InputBatch(max_num_reqs=2, max_model_len=64, block_size=BLOCK, vocab_size=50, device=torch.device("cpu"))
    held: dict[str, _Ref] = {}
    next_id, next_block = 0, 1
    for _ in range(80):
        gone = [r for r in held if rng.random() < 0.15]
        finished = set(gone[: len(gone) // 2 + 1]) if gone else set()
        preempted = set(gone) - finished
        for r in gone:
            del held[r]
        qlens: dict[str, int] = {}
        cached = []
        for r in list(held.values()):
            left = len(r.tokens) - r.computed
            if left == 0 or rng.random() < 0.2:
                continue  # not scheduled this step (budget), still held
            q = rng.randint(1, min(left, 9))
            qlens[r.req_id] = q
            need = -(-(r.computed + q) // BLOCK) - len(r.blocks)
            new_blocks = list(range(next_block, next_block + need))
            next_block += need
            r.blocks += new_blocks
            cached.append((r, CachedRequestData(r.req_id, new_blocks, r.computed)))
        rng.shuffle(cached)
        new = []
        for _ in range(rng.randint(0, 2)):
            prompt = [rng.randrange(50) for _ in range(rng.randint(1, 30))]
            computed = rng.randrange(len(prompt))  # a prefix-cache hit
            q = rng.randint(1, min(len(prompt) - computed, 12))
            count = -(-(computed + q) // BLOCK)
            ref = _Ref(f"r{next_id}", prompt, computed, list(range(next_block, next_block + count)))
            next_id, next_block = next_id + 1, next_block + count
            held[ref.req_id] = ref
            qlens[ref.req_id] = q
            params = SamplingParams(temperature=0.0 if rng.random() < 0.5 else 0.8, seed=rng.randrange(9))
            new.append((ref, NewRequestData(ref.req_id, prompt, [], params, {2}, list(ref.blocks), computed)))
        sched = SchedulerOutput([n for _, n in new], [c for _, c in cached], qlens, sum(qlens.values()),
                                finished, preempted)
        batch.update(sched)
        _check_rows(batch)
        assert set(batch.requests) == set(held)
        if sched.is_empty:
            continue
        order = [r for r, _ in cached] + [r for r, _ in new]
        ids, pos, slots, table, qsl, samples = _reference_inputs(order, qlens)
        inputs = batch.prepare(sched)
        md = inputs.attn_metadata
        assert inputs.req_ids == [r.req_id for r in order]
        assert inputs.input_ids.tolist() == ids and inputs.positions.tolist() == pos
        assert md.slot_mapping.tolist() == slots and md.block_tables.tolist() == table
        assert md.query_start_loc == qsl and md.query_start_loc_tensor.tolist() == qsl
        assert md.seq_lens == [r.computed + qlens[r.req_id] for r in order]
        assert inputs.sample_rows == samples
        if samples:
            assert inputs.logits_indices.tolist() == [qsl[i + 1] - 1 for i in samples]
            assert inputs.sampling_metadata.num_rows == len(samples)
        for i, r in enumerate(order):  # what the runner does after sampling, and the scheduler's bookkeeping
            r.computed += qlens[r.req_id]
            if i in samples:
                token = rng.randrange(50)
                r.output.append(token)
                inputs.states[i].output_token_ids.append(token)


def test_condense_moves_the_last_row_into_the_hole():
    batch = InputBatch(max_num_reqs=4, max_model_len=64, block_size=BLOCK, vocab_size=50, device=torch.device("cpu"))
    for name, blocks in (("a", [1]), ("b", [2, 3]), ("c", [4, 5, 6])):
        batch.add_request(NewRequestData(name, [1] * 9, [], SamplingParams(), set(), blocks, 0))
    batch.remove_request("a")
    assert batch.row_req == [None, "b", "c"]
    batch.condense()
    assert batch.row_of == {"c": 0, "b": 1} and batch.row_req == ["c", "b"]
    assert batch.block_table[0, :3].tolist() == [4, 5, 6] and not batch.block_table[2].any()
    assert set(batch.sampling.requests) == {"b", "c"}
    batch.update_request(CachedRequestData("c", [7], 9))
    assert batch.block_table[0, :4].tolist() == [4, 5, 6, 7] and batch.requests["c"].num_computed_tokens == 9


def _assert_same_metadata(a: SamplingMetadata, b: SamplingMetadata) -> None:
    for f in fields(SamplingMetadata):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, tuple):
            assert all(torch.equal(p, q) for p, q in zip(x, y)), f.name
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_persistent_sampling_metadata_equals_the_one_shot_build():
    vocab = 40
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, seed=3, logprobs=2),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, min_tokens=3,
                       stop_token_ids=[7], logit_bias={4: 1.5}, allowed_token_ids=[1, 2, 3, 4, 5, 6]),
        SamplingParams(temperature=0.9, top_p=0.5, bad_words_token_ids=[[9], [3, 4]]),
    ]
    rows = {str(i): SamplingRow(p, [i, 3, 3, 8], [], {2}, torch.Generator().manual_seed(i) if p.seed else None)
            for i, p in enumerate(kinds)}
    builder = SamplingMetadataBuilder(vocab, torch.device("cpu"))
    for req_id, row in rows.items():
        builder.add_request(req_id, row)
    rng = random.Random(0)
    order = list(rows)
    for step in range(6):
        if step == 3:
            builder.remove_request("1")
            order = ["3", "0", "2"]
        _assert_same_metadata(builder.build(order), SamplingMetadata.build([rows[r] for r in order], vocab, "cpu"))
        for r in order:
            rows[r].output_token_ids.append(rng.choice([3, 4, 7, 9, 11]))
