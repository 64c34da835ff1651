"""Sampling and outputs end to end on the real SmolLM2: seeds, logprobs vs HF, stop strings,
streaming deltas, n > 1 block sharing, chat."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.engine.output_processor import OutputKind

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "My favourite animal is", "Water boils at"]


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_top_k_1_equals_greedy(smollm_llm):
    greedy = smollm_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = smollm_llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=16, seed=7), use_tqdm=False)
    assert _ids(greedy) == _ids(top1)


def test_seed_reproducible_alone_and_in_a_mixed_batch(smollm_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = _ids(smollm_llm.generate(["Tell me a story:"], seeded, use_tqdm=False))[0]
    again = _ids(smollm_llm.generate(["Tell me a story:"], seeded, use_tqdm=False))[0]
    assert alone == again
    prompts, params = [], []
    for i in range(16):
        prompts.append("Tell me a story:" if i == 9 else PROMPTS[i % 4] + " " * (i % 3))
        params.append(seeded if i == 9 else SamplingParams(temperature=0.7 + 0.05 * i, top_k=20 + i, max_tokens=10 + i,
                                                           seed=None if i % 2 else i, presence_penalty=0.1 * (i % 3)))
    batch = _ids(smollm_llm.generate(prompts, params, use_tqdm=False))
    assert batch[9] == alone
    other = _ids(smollm_llm.generate(["Tell me a story:"], SamplingParams(
        temperature=1.0, top_p=0.95, max_tokens=24, seed=4321, ignore_eos=True), use_tqdm=False))[0]
    assert other != alone


def test_logprobs_match_hf(smollm_llm_fp32, hf_smollm):
    smollm_llm = smollm_llm_fp32  # fp32 weights: HF's load dequantizes the GGUF too
    hf_model, _ = hf_smollm
    outs = smollm_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, logprobs=5, prompt_logprobs=3,
                                                       ignore_eos=True), use_tqdm=False)
    for out in outs:
        prompt, gen = out.prompt_token_ids, out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + gen])).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)
        # Generated tokens: position len(prompt)-1+j predicts gen[j].
        for j, position in enumerate(out.outputs[0].logprobs):
            row = ref[len(prompt) - 1 + j]
            assert len(position) >= 5 and gen[j] in position
            for token_id, lp in position.items():
                assert abs(lp.logprob - row[token_id].item()) < 1e-3
            assert position[gen[j]].rank == 1  # greedy picks the top token
        # Prompt logprobs: the first is None, then teacher-forced logprobs of each next prompt token.
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for p in range(1, len(prompt)):
            entry = out.prompt_logprobs[p]
            assert prompt[p] in entry and len(entry) <= 4
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[p - 1][token_id].item()) < 1e-3
            true_rank = int((ref[p - 1] > ref[p - 1][prompt[p]]).sum()) + 1
            assert entry[prompt[p]].rank == true_rank
        assert out.outputs[0].cumulative_logprob == pytest.approx(
            sum(pos[t].logprob for pos, t in zip(out.outputs[0].logprobs, gen)), abs=1e-4)


def test_stop_strings_and_stop_tokens(smollm_llm):
    base = smollm_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=30),
                               use_tqdm=False)[0].outputs[0]
    assert "Paris." in base.text
    cut = smollm_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=30, stop=["is:", "ris."]),
                              use_tqdm=False)[0].outputs[0]
    assert cut.text == base.text[: base.text.index("ris.")] and cut.finish_reason == "stop" and cut.stop_reason == "ris."
    kept = smollm_llm.generate(["The capital of France is"], SamplingParams(
        temperature=0, max_tokens=30, stop="ris.", include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: base.text.index("ris.") + 4]
    stop_tok = base.token_ids[3]
    by_token = smollm_llm.generate(["The capital of France is"], SamplingParams(
        temperature=0, max_tokens=30, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(stop_tok)
    assert by_token.token_ids == base.token_ids[: first + 1] and by_token.stop_reason == stop_tok
    assert by_token.finish_reason == "stop"
    core = smollm_llm.llm_engine.core
    assert core.num_free_blocks == core.num_blocks


def test_streaming_deltas_concatenate_to_final_text(smollm_llm):
    engine = smollm_llm.llm_engine
    params = [SamplingParams(temperature=0, max_tokens=40),
              SamplingParams(temperature=0, max_tokens=40, stop=["\n\n"]),
              SamplingParams(temperature=0.8, seed=5, max_tokens=40, n=2)]
    prompts = ["Write a short poem with emoji 🌊 about the ocean:", "List three fruits:", "日本の首都は"]
    finals = smollm_llm.generate(prompts, params, use_tqdm=False)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"stream{i}", prompt, p, kind=OutputKind.DELTA)
    texts: dict[tuple[str, int], str] = {}
    tokens: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                texts[(out.request_id, c.index)] = texts.get((out.request_id, c.index), "") + c.text
                tokens.setdefault((out.request_id, c.index), []).extend(c.token_ids)
    for i, final in enumerate(finals):
        for c in final.outputs:
            assert texts[(f"stream{i}", c.index)] == c.text
            assert tokens[(f"stream{i}", c.index)] == c.token_ids


def test_n_samples_share_prompt_blocks(smollm_path):
    llm = LLM(smollm_path, max_model_len=1024, kv_cache_memory=64 << 20, enable_prefix_caching=False, quiet=True)
    engine = llm.llm_engine
    prompt = "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 30
    params = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)

    def peak_blocks(requests) -> int:
        peak = 0
        for rid, p in requests:
            engine.add_request(rid, prompt, p, kind=OutputKind.FINAL_ONLY)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
            peak = max(peak, engine.core.num_blocks - engine.core.num_free_blocks)
        assert engine.core.num_free_blocks == engine.core.num_blocks
        return peak, outs

    shared_peak, outs = peak_blocks([("n4", params)])
    assert len(outs) == 1 and len(outs[0].outputs) == 4 and [c.index for c in outs[0].outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # the samples diverge
    separate = SamplingParams(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    separate_peak, _ = peak_blocks([(f"s{i}", separate) for i in range(4)])
    assert shared_peak < separate_peak
    prompt_blocks = len(outs[0].prompt_token_ids) // 16
    assert separate_peak - shared_peak >= 3 * prompt_blocks - 3
    # Same seed, same result.
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in outs[0].outputs]


def test_chat_applies_template_and_requires_one(smollm_llm):
    out = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>system") and out.prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out.outputs[0].text
    many = smollm_llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                           SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(many) == 2
    custom = smollm_llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4),
                             chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
                             use_tqdm=False)[0]
    assert custom.prompt == "[user] Hi\n"
    tok = smollm_llm.get_tokenizer()
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            smollm_llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)
    finally:
        tok.chat_template = saved
    with pytest.raises(ValueError, match="role"):
        smollm_llm.chat([{"role": "wizard", "content": "Hi"}], use_tqdm=False)
