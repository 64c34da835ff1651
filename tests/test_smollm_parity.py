"""Greedy parity with HF transformers on the real SmolLM2-135M-Instruct GGUF (fp32, CPU, dequantized
at load: quantization="none"; tests/test_quantized_weights.py covers the quantized load).

All prompts go through ONE `generate` call (continuous batching, chunked prefill, mixed
prompt/decode steps); HF runs the short prompts in one left-padded batch and the long one alone
(`hf_smollm_greedy` in conftest). Where the two sequences differ, the first
differing step must be a near tie: each side's token in the other's top-5.
"""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from tests.conftest import assert_top5_near_ties

pytestmark = pytest.mark.slow

_STORY = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had "
          "taught him, and at the top he wiped the salt from the great lens before lighting the lamp. ")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three primary colors:",
    "Once upon a time, in a small village by the mountains,",
    "Q: What is 12 times 12?\nA:",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Summarize the following story in one sentence.\n\n" + _STORY * 14 + "\n\nSummary:",
]
MAX_NEW = 48


@pytest.fixture(scope="module")
def runs(smollm_llm_fp32, hf_smollm, hf_smollm_greedy):
    smollm_llm = smollm_llm_fp32
    _, hf_tok = hf_smollm
    tok = smollm_llm.get_tokenizer()
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    assert prompt_ids == [hf_tok(p).input_ids for p in PROMPTS]  # same tokenizer behaviour as HF
    assert max(len(p) for p in prompt_ids) > 500
    ours = smollm_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=5), use_tqdm=False)
    return ours, hf_smollm_greedy


def test_greedy_tokens_match_hf(runs):
    ours, theirs = runs
    assert_top5_near_ties(ours, theirs)


def test_text_and_finish(runs, smollm_llm_fp32):
    smollm_llm = smollm_llm_fp32
    ours, _ = runs
    tok = smollm_llm.get_tokenizer()
    for out in ours:
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "length") == (len(c.token_ids) == MAX_NEW and c.token_ids[-1] not in (2,))
    assert "Paris" in ours[0].outputs[0].text
    core = smollm_llm.llm_engine.core
    assert core.num_free_blocks == core.num_blocks
