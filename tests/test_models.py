"""Every architecture against HF transformers on tiny random checkpoints (saved by transformers,
loaded by our HF loader): greedy tokens and their logprobs, the sliding window under chunked
prefill / preemption / prefix caching, the MoE layer, and the registry."""

from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
import transformers

from pagellm import LLM, SamplingParams
from pagellm.layers.moe import SparseMoE, grouped_expert_mlp, select_experts
from pagellm.models.registry import get_model_class, supported_architectures
from tests.conftest import first_divergence, hf_greedy

VOCAB = 256
NEW_TOKENS = 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _longrope(original: int, rotary_dim: int) -> dict:
    rng = random.Random(original)
    half = rotary_dim // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + rng.random() for _ in range(half)],
            "long_factor": [2.0 + 6 * rng.random() for _ in range(half)]}


# name -> (HF config class, config kwargs, max_model_len, prompt lengths)
ARCHS = {
    # Layer 0 full attention, layer 1 a window of 8 (max_window_layers); biased q/k/v.
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  tie_word_embeddings=True), 128, [3, 9, 30, 41]),
    "qwen3": ("Qwen3Config", dict(head_dim=24, attention_bias=True, tie_word_embeddings=True), 128, [3, 9, 30, 41]),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False), 128, [3, 9, 30, 41]),
    # LongRoPE with max_model_len <= original context: short factors (HF's choice for these lengths);
    # the saved config names it "su", as older Phi-3 checkpoints do.
    "phi3_longrope_short": ("Phi3Config", dict(original_max_position_embeddings=64, tie_word_embeddings=False,
                                               rope_scaling=_longrope(64, 16)), 64, [3, 9, 30, 41]),
    # max_model_len > original context: long factors; every prompt is longer than the original
    # context, so HF uses the long factors from its first step too. Half the head rotates; window 12.
    "phi3_longrope_long_partial": ("Phi3Config", dict(
        original_max_position_embeddings=32, partial_rotary_factor=0.5, sliding_window=12,
        tie_word_embeddings=False, rope_scaling=_longrope(32, 8)), 256, [33, 40, 57, 70]),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12,
                                      tie_word_embeddings=False), 128, [3, 9, 30, 41]),
}


def make_tiny(path: str, arch: str, seed: int = 0):
    """Saves a random-weight checkpoint of `arch` with transformers; returns (path, the HF model)."""
    config_name, kwargs, _, _ = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **kwargs})
    model_cls = getattr(transformers, config_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # tests decide about EOS themselves
    model.save_pretrained(path, safe_serialization=True)
    if arch == "phi3_longrope_short":
        _write_legacy_su_config(path)
    return path, model


def _write_legacy_su_config(path: str) -> None:
    """Rewrites the saved config as older Phi-3 checkpoints have it: `rope_scaling` of type "su"."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f)


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_matches_hf(tmp_path, arch):
    path, hf = make_tiny(str(tmp_path / arch), arch, seed=len(arch))
    _, _, max_model_len, lengths = ARCHS[arch]
    prompts = _prompts(lengths, seed=len(arch))
    # A 32-token step budget splits the longer prompts into chunks that attend to cached context.
    llm = LLM(path, skip_tokenizer_init=True, quiet=True, dtype="float32", max_model_len=max_model_len,
              max_num_batched_tokens=32, kv_cache_memory=8 << 20)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        theirs, logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert ours == theirs, f"{arch}: prompt of {len(prompt)} tokens diverges at {first_divergence(ours, theirs)}"
        for step, (token, step_logits) in enumerate(zip(ours, logits)):
            ref = torch.log_softmax(step_logits.float(), -1)[token].item()
            got = out.outputs[0].logprobs[step][token].logprob
            assert abs(got - ref) < 1e-3, f"{arch}: step {step} logprob {got} vs HF {ref}"
    assert llm.llm_engine.core.num_free_blocks == llm.llm_engine.core.num_blocks


def test_sliding_window_chunked_preempted_and_prefix_cached_match(tmp_path):
    """A window of 8 with chunked prefill, preemption and prefix-cache hits: same tokens as one whole prefill."""
    path, hf = make_tiny(str(tmp_path / "mistral"), "mistral", seed=7)
    rng = random.Random(7)
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]  # 2.5 blocks shared by the first four prompts
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 5, 12, 23)]
    prompts += _prompts([3, 17, 50, 61], seed=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def run(**kwargs):
        # On the CPU, where kv_cache_memory sizes the pool (the preemption case depends on it).
        llm = LLM(path, skip_tokenizer_init=True, quiet=True, device="cpu", dtype="float32", max_model_len=128,
                  **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        core = llm.llm_engine.core
        assert core.num_free_blocks == core.num_blocks, "blocks leaked"
        return [o.outputs[0].token_ids for o in outs], core

    reference, _ = run(enable_chunked_prefill=False, enable_prefix_caching=False, kv_cache_memory=8 << 20)
    assert reference[6] == hf_greedy(hf, prompts[6], 16)[0]  # the reference itself is HF's
    chunked, _ = run(max_num_batched_tokens=16, enable_prefix_caching=False, kv_cache_memory=8 << 20)
    assert chunked == reference
    # 12 blocks of 16 tokens cannot hold eight requests of up to 77 tokens: the scheduler preempts.
    per_block = 16 * 2 * 2 * 2 * 16 * 4  # block_size * (k, v) * layers * kv_heads * head_dim * fp32
    preempted, core = run(kv_cache_memory=12 * per_block, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert core.scheduler.num_preemptions_total > 0
    assert preempted == reference
    cached, core = run(enable_prefix_caching=True, max_num_batched_tokens=32, kv_cache_memory=8 << 20)
    assert cached == reference
    assert core.kv.prefix_cache_hits > 0


def test_sparse_moe_matches_hf_block_and_a_dense_reference():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = SparseMoE(32, 48, 5, 2)
    ours.gate.weight.data.copy_(hf.gate.weight)
    for e in range(5):
        gate, up = hf.experts.gate_up_proj[e].chunk(2, dim=0)
        ours.load_expert(e, "w1", gate)
        ours.load_expert(e, "w3", up)
        ours.load_expert(e, "w2", hf.experts.down_proj[e])
    assert ours.missing_weights() == []
    x = torch.randn(37, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x.unsqueeze(0)).squeeze(0), rtol=1e-5, atol=1e-5)
        # The grouped computation equals every expert run densely and weighted per token.
        weights, ids = select_experts(ours.gate(x), 2)
        dense = torch.stack([torch.nn.functional.linear(
            torch.nn.functional.silu(x @ ours.w13[e, :48].T) * (x @ ours.w13[e, 48:].T), ours.w2[e]) for e in range(5)])
        expected = sum(weights[:, k, None] * dense[ids[:, k], torch.arange(37)] for k in range(2))
        torch.testing.assert_close(grouped_expert_mlp(x, ours.w13, ours.w2, weights, ids), expected)
    assert torch.allclose(weights.sum(-1), torch.ones(37))  # renormalised top-2


def test_mixtral_load_reports_missing_experts(tmp_path):
    path, hf = make_tiny(str(tmp_path / "mixtral"), "mixtral")
    from pagellm.loader.hf import iter_safetensors_weights

    model = get_model_class(hf.config)(hf.config, 64)
    weights = [(n, t) for n, t in iter_safetensors_weights(path, torch.float32) if "experts.3.w2" not in n]
    with pytest.raises(ValueError, match=r"missing 2 tensors.*experts\.3\.w2"):
        model.load_weights(weights)


def test_registry_maps_hf_and_gguf_names():
    from pagellm.models.llama import LlamaForCausalLM
    from pagellm.models.mistral import MistralForCausalLM
    from pagellm.models.mixtral import MixtralForCausalLM
    from pagellm.models.phi3 import Phi3ForCausalLM
    from pagellm.models.qwen2 import Qwen2ForCausalLM
    from pagellm.models.qwen3 import Qwen3ForCausalLM

    expected = {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": MistralForCausalLM,
                "Qwen2ForCausalLM": Qwen2ForCausalLM, "Qwen3ForCausalLM": Qwen3ForCausalLM,
                "Phi3ForCausalLM": Phi3ForCausalLM, "MixtralForCausalLM": MixtralForCausalLM}
    for name, cls in expected.items():
        assert get_model_class(SimpleNamespace(architectures=[name], model_type=None)) is cls
    # GGUF-built configs may carry only a model_type.
    for model_type, cls in {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
                            "qwen3": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM}.items():
        assert get_model_class(SimpleNamespace(architectures=None, model_type=model_type)) is cls
    assert {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"} <= set(supported_architectures())


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model architecture.*GPT2LMHeadModel") as err:
        get_model_class(SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                 "Phi3ForCausalLM", "MixtralForCausalLM", "Gemma3ForCausalLM"):
        assert name in str(err.value)
