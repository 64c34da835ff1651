"""Real weights at tp=3: SmolLM2-135M (9 heads, 3 KV heads), one KV head per rank, its GGUF Q4_1
weights kept quantized on every rank (each rank holds only its rows / block-aligned columns).
The tp=1 reference is the suite's shared quantized engine."""

from __future__ import annotations

from pagellm import LLM, SamplingParams
from tests.conftest import greedy_near_ties

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 12, 345, 678, 90]]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)


def _run(llm: LLM):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    executor = llm.llm_engine.core.executor
    return outs, executor.collective_rpc("weight_bytes"), executor.collective_rpc("quantized_linear_count")


def test_smollm2_tp3_quantized_matches_tp1(smollm_llm, smollm_path):
    ref, (full_bytes,), (ref_quantized,) = _run(smollm_llm)
    llm = LLM(smollm_path, tensor_parallel_size=3, max_model_len=128, kv_cache_memory=1 << 24, skip_tokenizer_init=True)
    try:
        got, rank_bytes, quantized = _run(llm)
    finally:
        llm.llm_engine.core.executor.shutdown()
    # Every linear stays quantized on every rank (no dequantize-then-shard fallback for SmolLM2's shapes).
    assert ref_quantized > 0 and quantized == [ref_quantized] * 3
    # Each rank holds about a third of the weights (norms are replicated; the reference's rope tables are
    # sized for its longer max_model_len).
    for b in rank_bytes:
        assert 0.95 * full_bytes / 3 <= b <= 1.05 * full_bytes / 3, (b, full_bytes)

    def near_tie(i: int, d: int) -> tuple:
        mine, theirs = got[i].outputs[0], ref[i].outputs[0]
        assert theirs.token_ids[d] in mine.logprobs[d] and mine.token_ids[d] in theirs.logprobs[d], \
            f"prompt {i}: real divergence at step {d}"
        return i, d

    pairs = ((i, got[i].outputs[0].token_ids, ref[i].outputs[0].token_ids) for i in range(len(PROMPTS)))
    assert len(greedy_near_ties(pairs, near_tie)) <= 1
