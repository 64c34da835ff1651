"""The real Gemma 3 270M (4 heads, 1 KV head) at tp=2: the KV head is replicated on both ranks,
and greedy tokens equal the single-process engine's on the Gemma 3 parity prompts."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.loader import gemma3_270m_path
from tests.conftest import greedy_near_ties
from tests.test_gemma3 import REAL_PROMPTS


def _run(tp: int):
    llm = LLM(gemma3_270m_path(), tensor_parallel_size=tp, max_model_len=1024, kv_cache_memory=48 << 20, quiet=True)
    outs = llm.generate(REAL_PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    executor = llm.llm_engine.core.executor
    kv_heads = executor.collective_rpc("kv_bytes_per_token")
    if tp > 1:
        executor.shutdown()
    return outs, kv_heads


@pytest.mark.slow
def test_gemma3_270m_tp2_replicated_kv_head_matches_tp1():
    ref, (ref_kv,) = _run(1)
    got, rank_kv = _run(2)
    assert rank_kv == [ref_kv, ref_kv]  # the one KV head is held whole by both ranks

    def near_tie(i: int, d: int) -> tuple:
        mine, theirs = got[i].outputs[0], ref[i].outputs[0]
        assert theirs.token_ids[d] in mine.logprobs[d] and mine.token_ids[d] in theirs.logprobs[d], \
            f"prompt {i}: real divergence at step {d}"
        return i, d

    pairs = ((i, got[i].outputs[0].token_ids, ref[i].outputs[0].token_ids) for i in range(len(REAL_PROMPTS)))
    assert len(greedy_near_ties(pairs, near_tie)) <= 1
