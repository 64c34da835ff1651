"""Engine-level behaviour: chunked prefill / preemption / prefix caching on-off parity, block accounting,
abort, and bad input. Runs on a tiny random Llama (fast) and once on the real SmolLM2."""

from __future__ import annotations

import random

import pytest

from pagellm import LLM, SamplingParams
from pagellm.engine.output_processor import OutputKind
from tests.conftest import make_tiny_llama

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), seed=11)


def _prompts(seed: int = 0, n: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.choice([1, 5, 30, 70, 150, 300]))] for _ in range(n)]


def _run(path, prompts, params=GREEDY, **kwargs):
    llm = LLM(path, skip_tokenizer_init=True, quiet=True, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    core = llm.llm_engine.core
    assert core.num_free_blocks == core.num_blocks, "blocks leaked"
    return [o.outputs[0].token_ids for o in outs], core


def test_chunked_prefill_and_preemption_do_not_change_outputs(tiny_path):
    prompts = _prompts()
    reference, _ = _run(tiny_path, prompts, enable_chunked_prefill=False, enable_prefix_caching=False)
    chunked, _ = _run(tiny_path, prompts, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert chunked == reference
    # 40 blocks of 16 tokens: far less than 12 requests need at once, so the scheduler must preempt.
    tiny_kv = 40 * 16 * 2 * 2 * 2 * 16 * 4  # blocks * block_size * (k,v) * layers * kv_heads * head_dim * fp32
    preempted, core = _run(tiny_path, prompts, kv_cache_memory=tiny_kv, max_num_batched_tokens=64, max_model_len=512)
    assert core.scheduler.num_preemptions_total > 0
    assert preempted == reference
    cached, core = _run(tiny_path, prompts + prompts[:4], enable_prefix_caching=True)
    assert cached == reference + reference[:4]
    assert core.kv.prefix_cache_hits > 0


def test_block_size_does_not_change_outputs(tiny_path):
    prompts = _prompts(seed=3, n=6)
    reference, _ = _run(tiny_path, prompts)
    for block_size in (1, 8, 64):
        outs, _ = _run(tiny_path, prompts, block_size=block_size)
        assert outs == reference, f"block_size={block_size}"


def test_real_model_preemption_matches(smollm_path, smollm_llm):
    prompts = ["The capital of France is", "Once upon a time", "def quicksort(arr):", "The three laws of robotics are"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in smollm_llm.generate(prompts, params, use_tqdm=False)]
    per_token = 2 * 30 * 3 * 64 * 4
    small = LLM(smollm_path, kv_cache_memory=per_token * 16 * 5, max_num_batched_tokens=16, max_model_len=64, quiet=True)
    outs = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.llm_engine.core.scheduler.num_preemptions_total > 0
    assert outs == reference
    assert small.llm_engine.core.num_free_blocks == small.llm_engine.core.num_blocks


def test_abort_frees_everything(tiny_path):
    llm = LLM(tiny_path, skip_tokenizer_init=True, quiet=True, max_num_seqs=2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i, p in enumerate(_prompts(seed=5, n=4)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params, kind=OutputKind.DELTA)
    for _ in range(3):
        engine.step()
    assert engine.core.scheduler.stats().num_running == 2 and engine.core.scheduler.stats().num_waiting == 2
    aborted = engine.abort_request(["r0", "r3"])  # one running, one waiting
    assert {o.request_id for o in aborted} == {"r0", "r3"}
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in aborted)
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"r1", "r2"}
    assert engine.core.num_free_blocks == engine.core.num_blocks
    assert engine.abort_request("unknown") == []


def test_bad_input_is_rejected_and_engine_keeps_serving(tiny_path):
    llm = LLM(tiny_path, skip_tokenizer_init=True, quiet=True, max_model_len=128)
    engine = llm.llm_engine
    engine.add_request("ok", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    cases = [
        ([], "no prompts"),
        ([[]], "empty"),
        ([[5] * 200], "max_model_len"),
        ([[5] * 128], "max_model_len"),
        ([[100000]], "vocabulary"),
        (["text needs a tokenizer"], "tokenizer"),
        ([[1.5]], "integers"),
    ]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[5, 6]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([[5, 6]], SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", {"prompt_token_ids": [5]}, SamplingParams())
    # The request admitted before all that still completes normally.
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and len(outs[-1].outputs[0].token_ids) == 8
    assert engine.core.num_free_blocks == engine.core.num_blocks


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_token_id_prompt_forms(tiny_path):
    llm = LLM(tiny_path, skip_tokenizer_init=True, quiet=True)
    a = llm.generate([7, 8, 9], GREEDY, use_tqdm=False)  # a single prompt as a flat id list
    b = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)
    c = llm.generate({"prompt_token_ids": [7, 8, 9]}, GREEDY, use_tqdm=False)
    assert len(a) == len(b) == len(c) == 1
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids == c[0].outputs[0].token_ids
    assert a[0].prompt_token_ids == [7, 8, 9]
