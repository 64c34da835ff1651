"""Prefix caching end to end on a tiny random Llama: outputs with the cache on equal outputs with it
off (shared prefixes, chunked prefill, forced preemption, n > 1), cached-token counts, cache_salt,
prompt_logprobs and reset_prefix_cache."""

from __future__ import annotations

import random

import pytest

from pagellm import LLM, SamplingParams
from tests.conftest import make_tiny_llama

BLOCK = 8
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# K and V, 2 layers, 2 KV heads of 16 fp32 values: bytes of KV per token of the tiny model.
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"), seed=21)


def shared_prefix_prompts(seed: int = 0, num_prefixes: int = 3, num_prompts: int = 10) -> list[list[int]]:
    """Prompts made of one of a few long prefixes (not block-aligned) plus a short unique suffix."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 512) for _ in range(rng.randrange(20, 60))] for _ in range(num_prefixes)]
    return [rng.choice(prefixes) + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 12))]
            for _ in range(num_prompts)]


def make_llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("block_size", BLOCK)
    kwargs.setdefault("max_model_len", 96)
    return LLM(path, skip_tokenizer_init=True, quiet=True, **kwargs)


def run(llm: LLM, prompts, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    core = llm.llm_engine.core
    # Every block is free once all requests end; full blocks stay cached for later requests.
    assert core.num_free_blocks == core.num_blocks, "blocks leaked"
    assert all(b.ref_cnt == 0 for b in core.kv.pool.blocks)
    return outs


def token_ids(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def expected_cached(prompt_len: int) -> int:
    """Whole blocks of the prompt, always leaving its last token to compute."""
    return (prompt_len - 1) // BLOCK * BLOCK


@pytest.mark.parametrize("setting", ["plain", "chunked", "preempted", "n>1"])
def test_cache_on_equals_cache_off(tiny_path, setting):
    prompts = shared_prefix_prompts(seed=len(setting))
    params = GREEDY
    kwargs: dict = {}
    if setting == "chunked":
        kwargs["max_num_batched_tokens"] = 32  # prefixes are computed over several steps
    elif setting == "preempted":
        # 12 blocks of 8 tokens: far less than the batch needs, so the scheduler must preempt.
        kwargs.update(kv_cache_memory=12 * BLOCK * TINY_KV_BYTES_PER_TOKEN, max_num_batched_tokens=32)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    elif setting == "n>1":
        params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)
    off_llm = make_llm(tiny_path, enable_prefix_caching=False, **kwargs)
    on_llm = make_llm(tiny_path, enable_prefix_caching=True, **kwargs)
    off = run(off_llm, prompts, params)
    on = run(on_llm, prompts, params)
    assert token_ids(on) == token_ids(off)
    kv_on = on_llm.llm_engine.core.kv
    assert kv_on.prefix_cache_hits > 0
    assert kv_on.pool.num_cached_blocks > 0  # still cached after everything finished
    if setting == "preempted":
        assert on_llm.llm_engine.core.scheduler.num_preemptions_total > 0
        assert off_llm.llm_engine.core.scheduler.num_preemptions_total > 0
    if setting == "n>1":
        assert all(len({tuple(c.token_ids) for c in o.outputs}) > 1 for o in on)  # the samples differ
    if setting == "plain":
        # A second pass over the same prompts hits the cache and still gives the same outputs.
        again = run(on_llm, prompts, params)
        assert token_ids(again) == token_ids(off)
        assert [o.num_cached_tokens for o in again] == [expected_cached(len(p)) for p in prompts]


def test_a_resumed_request_hits_its_own_blocks(tiny_path):
    # Unique prompts share nothing, so every hit comes from a preempted request finding its own blocks.
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(30)] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kv_memory = 12 * BLOCK * TINY_KV_BYTES_PER_TOKEN
    reference = run(make_llm(tiny_path, enable_prefix_caching=False), prompts, params)
    llm = make_llm(tiny_path, kv_cache_memory=kv_memory, max_num_batched_tokens=32)
    outs = run(llm, prompts, params)
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions_total > 0
    assert core.kv.prefix_cache_hits > 0
    assert token_ids(outs) == token_ids(reference)
    assert all(o.num_cached_tokens == 0 for o in outs)  # usage counts first admission only


def test_second_identical_request_reports_cached_tokens(tiny_path):
    llm = make_llm(tiny_path)
    rng = random.Random(9)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for length in (1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 3 * BLOCK + 5):
        prompt = [rng.randrange(3, 512) for _ in range(length)]
        first = run(llm, [prompt], short)[0]
        second = run(llm, [prompt], short)[0]
        assert first.num_cached_tokens == 0, length
        assert second.num_cached_tokens == expected_cached(length), length
        assert second.outputs[0].token_ids == first.outputs[0].token_ids
    # Both at once: the second is admitted in the same step and reuses the first's blocks.
    prompt = [rng.randrange(3, 512) for _ in range(2 * BLOCK + 3)]
    a, b = run(llm, [prompt, prompt])
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 2 * BLOCK)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_cache_salt_isolates_tenants(tiny_path):
    llm = make_llm(tiny_path)
    prompt = list(range(100, 100 + 3 * BLOCK + 2))
    cached = expected_cached(len(prompt))

    def cached_tokens(**salt) -> tuple[int, list[int]]:
        out = llm.generate({"prompt_token_ids": prompt, **salt}, GREEDY, use_tqdm=False)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    n, first = cached_tokens(cache_salt="tenant-a")
    assert n == 0
    assert cached_tokens()[0] == 0  # unsalted requests do not see tenant-a's blocks
    assert cached_tokens(cache_salt="tenant-b")[0] == 0
    n, again = cached_tokens(cache_salt="tenant-a")
    assert n == cached and again == first  # the salt changes sharing, never the output
    assert cached_tokens()[0] == cached
    for bad in ("", 3):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate({"prompt_token_ids": prompt, "cache_salt": bad}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="cache_sallt"):
        llm.generate({"prompt_token_ids": prompt, "cache_sallt": "x"}, GREEDY, use_tqdm=False)


def test_prompt_logprobs_bypass_the_cache(tiny_path):
    """Requests asking for prompt logprobs compute their whole prompt (cached positions would have no
    logits); their results equal those of an engine without the cache."""
    prompt = list(range(200, 200 + 4 * BLOCK + 3))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    off = run(make_llm(tiny_path, enable_prefix_caching=False), [prompt], params)[0]
    llm = make_llm(tiny_path)
    run(llm, [prompt])  # caches the prompt
    hits_before = llm.llm_engine.core.kv.prefix_cache_hits
    on = run(llm, [prompt], params)[0]
    assert on.num_cached_tokens == 0
    assert llm.llm_engine.core.kv.prefix_cache_hits == hits_before
    assert len(on.prompt_logprobs) == len(prompt) and on.prompt_logprobs[0] is None
    for got, want in zip(on.prompt_logprobs[1:], off.prompt_logprobs[1:]):
        assert got.keys() == want.keys()
        for tid in got:
            assert got[tid].logprob == pytest.approx(want[tid].logprob, abs=1e-5)
            assert got[tid].rank == want[tid].rank
    assert on.outputs[0].token_ids == off.outputs[0].token_ids
    # A plain request afterwards still hits.
    assert run(llm, [prompt])[0].num_cached_tokens == expected_cached(len(prompt))


def test_reset_prefix_cache(tiny_path):
    llm = make_llm(tiny_path)
    prompt = list(range(300, 300 + 2 * BLOCK + 1))
    run(llm, [prompt])
    assert run(llm, [prompt])[0].num_cached_tokens == 2 * BLOCK
    assert llm.reset_prefix_cache() is True
    assert llm.llm_engine.core.kv.pool.num_cached_blocks == 0
    assert run(llm, [prompt])[0].num_cached_tokens == 0
    # Refused while a request holds blocks; nothing is dropped then.
    engine = llm.llm_engine
    engine.add_request("busy", {"prompt_token_ids": prompt}, GREEDY)
    engine.step()
    assert engine.core.kv.pool.num_cached_blocks > 0
    assert llm.reset_prefix_cache() is False
    assert engine.core.kv.pool.num_cached_blocks > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache() is True


def test_prefix_caching_off_caches_nothing_across_requests(tiny_path):
    llm = make_llm(tiny_path, enable_prefix_caching=False)
    prompt = list(range(400, 400 + 3 * BLOCK))
    run(llm, [prompt])
    assert run(llm, [prompt])[0].num_cached_tokens == 0
    assert llm.llm_engine.core.kv.prefix_cache_hits == 0
