"""Speculative decoding end to end on the real SmolLM2: greedy tokens identical with it on and off.

One `generate` call per engine over the parity prompts (chunked prefill with a small token budget,
a KV pool small enough to preempt), against the shared plain engine. Each proposer gets one
engine: n-gram with prefix caching on, suffix with it off, and a draft model twice (the target
itself, which must accept what it proposes, and a tiny random model with the same vocabulary,
which proposes junk that must all be rejected harmlessly). The n-gram engine also runs n > 1,
stop strings and max_tokens boundaries inside a verification window.
"""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from tests.conftest import make_tiny_llama
from tests.test_smollm_parity import PROMPTS

pytestmark = pytest.mark.slow

MAX_NEW = 40
K = 4
# ~47 KiB of fp32 KV per token: 640 tokens in all, less than the prompts and outputs together.
SMALL_POOL = dict(max_model_len=600, kv_cache_memory=29 << 20, max_num_batched_tokens=96, quiet=True)


def greedy(max_tokens: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def plain(smollm_llm):
    return [o.outputs[0].token_ids for o in smollm_llm.generate(PROMPTS, greedy(), use_tqdm=False)]


def spec_engine(smollm_path, config: dict, **kw) -> LLM:
    # The batch-size switch off: the whole batch speculates (the default stops at batch 1).
    return LLM(smollm_path, speculative_config={"num_speculative_tokens": K, "disable_by_batch_size": 0, **config},
               **{**SMALL_POOL, **kw})


def run_and_check(llm: LLM, plain: list[list[int]]) -> dict:
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    stats = llm.llm_engine.core.stats()
    assert stats.num_preemptions_total > 0, "the pool was meant to be small enough to preempt"
    assert llm.llm_engine.core.kv.num_free_blocks == llm.llm_engine.core.kv.num_blocks
    return stats.spec_decode


@pytest.fixture(scope="module")
def ngram_llm(smollm_path):
    return spec_engine(smollm_path, {"method": "ngram", "prompt_lookup_max": 4}, enable_prefix_caching=True)


def test_ngram_greedy_identical_with_prefix_caching(ngram_llm, plain):
    spec = run_and_check(ngram_llm, plain)
    assert spec.num_accepted_tokens > 20 and spec.num_draft_tokens > spec.num_accepted_tokens


def test_ngram_n_stop_strings_and_max_tokens(ngram_llm, smollm_llm):
    prompts = PROMPTS[:5]
    cases = [greedy(n=2), greedy(stop=["\n", " the"]), greedy(max_tokens=1), greedy(max_tokens=3),
             greedy(max_tokens=K + 2), greedy(min_tokens=8, max_tokens=12)]
    for params in cases:
        ours = ngram_llm.generate(prompts, params, use_tqdm=False)
        ref = smollm_llm.generate(prompts, params, use_tqdm=False)
        for a, b in zip(ours, ref):
            assert [(c.token_ids, c.text, c.finish_reason) for c in a.outputs] == \
                [(c.token_ids, c.text, c.finish_reason) for c in b.outputs], params
            assert all(len(c.token_ids) <= params.max_tokens for c in a.outputs)


def test_suffix_greedy_identical_without_prefix_caching(smollm_path, plain):
    llm = spec_engine(smollm_path, {"method": "suffix"}, enable_prefix_caching=False)
    spec = run_and_check(llm, plain)
    assert spec.num_accepted_tokens > 20


def test_draft_equal_to_target_accepts_its_proposals(smollm_path, plain):
    llm = spec_engine(smollm_path, {"method": "draft_model", "model": smollm_path})
    spec = run_and_check(llm, plain)
    # The draft is the target: every greedy proposal is the target's own token, except where the
    # draft's one-token decode and the target's (k + 1)-token verification round a near tie apart.
    assert spec.num_draft_tokens > 50  # (its own KV pool is a quarter of the small one: not every step)
    assert spec.num_accepted_tokens >= 0.97 * spec.num_draft_tokens


def test_tiny_random_draft_keeps_the_greedy_output(smollm_path, smollm_llm, plain, tmp_path):
    vocab = smollm_llm.llm_engine.setup.model_config.vocab_size
    draft = make_tiny_llama(str(tmp_path / "draft"), vocab_size=vocab, hidden=32, layers=1, heads=2, num_kv_heads=1)
    llm = spec_engine(smollm_path, {"method": "draft_model", "model": draft})
    spec = run_and_check(llm, plain)
    assert spec.num_draft_tokens > 50 and spec.num_accepted_tokens < 0.2 * spec.num_draft_tokens
