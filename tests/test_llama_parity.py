"""Greedy parity with HF transformers on tiny random Llama checkpoints (real HF save/load path)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from tests.conftest import first_divergence, hf_greedy, make_tiny_llama

VARIANTS = {
    "gqa_tied": dict(tie=True, num_kv_heads=2),
    "mha_untied": dict(tie=False, num_kv_heads=4, seed=1),
    "mqa_bias": dict(tie=False, num_kv_heads=1, bias=True, seed=2),
    "llama3_rope": dict(tie=True, num_kv_heads=2, seed=3, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
}


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 64, 129, 250, 7][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_llama_greedy_matches_hf(tmp_path, variant):
    path = make_tiny_llama(str(tmp_path / variant), **VARIANTS[variant])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(8, 512, seed=len(variant))
    llm = LLM(path, skip_tokenizer_init=True, max_num_batched_tokens=96, quiet=True)  # forces chunked prefill
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        theirs, _ = hf_greedy(hf, prompt, 24)
        assert ours == theirs, f"{variant}: prompt of {len(prompt)} tokens diverges at {first_divergence(ours, theirs)}"
        assert out.outputs[0].text == ""  # no tokenizer: token ids only
        assert out.outputs[0].finish_reason == "length"
    assert llm.llm_engine.core.num_free_blocks == llm.llm_engine.core.num_blocks


def test_logits_match_hf_forward(tmp_path):
    """One prefill's last-position logits agree with HF's to float32 noise."""
    path = make_tiny_llama(str(tmp_path / "m"), tie=False, num_kv_heads=2, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, skip_tokenizer_init=True, quiet=True)
    prompt = list(range(3, 60))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
    for token_id, lp in out.outputs[0].logprobs[0].items():
        assert abs(lp.logprob - ref[token_id].item()) < 1e-4
