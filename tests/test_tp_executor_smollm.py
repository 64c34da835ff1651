"""Real weights at tp=3: SmolLM2-135M (9 heads, 3 KV heads), one KV head per rank."""

from __future__ import annotations

from pagellm import LLM, SamplingParams

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 12, 345, 678, 90]]


def _tokens(tp: int) -> list[list[int]]:
    llm = LLM(None, tensor_parallel_size=tp, max_model_len=128, kv_cache_memory=1 << 24, skip_tokenizer_init=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    if tp > 1:
        llm.llm_engine.core.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_tp3_matches_tp1():
    assert _tokens(3) == _tokens(1)
