"""GGUF files of the architectures llama.cpp names qwen2, qwen3, phi3 and gemma3, end to end.

Each test writes a tiny random model as llama.cpp's converter would (F32 tensors, llama.cpp names,
Phi-3's fused attn_qkv / ffn_up, Gemma's +1 norms), then checks that our engine's greedy tokens
equal those of transformers' own GGUF load of the same file. The files carry no tokenizer, so
prompts go in as token ids.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Phi3Config, Qwen2Config, Qwen3Config

from pagellm import LLM, SamplingParams
from pagellm.loader import gguf_architecture, iter_weights, resolve_model
from tests.conftest import first_divergence, hf_greedy
from tests.test_loader import write_gguf

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
# Qwen3 keeps head_dim 128: transformers' GGUF config reader does not read Qwen3's key_length.
# Gemma 3 gets 6 layers so that one is global (every 6th), and a window shorter than the prompts.
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=128, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(**{**_TINY, "num_hidden_layers": 6}, head_dim=16, sliding_window=8),
}
# Special-token ids transformers reads from tokenizer.ggml.* (Phi-3's defaults lie outside a tiny vocab).
_TOKEN_IDS = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0}


def _random_model(arch: str):
    torch.manual_seed(len(arch))
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # multiples of 1/256 keep Gemma's "+1" exactly reversible
                param.copy_(torch.round(torch.rand_like(param) * 256) / 256)
            else:  # biases too (Qwen2 has q/k/v biases), which HF initialises to zero
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_tiny_gguf_greedy_matches_transformers(tmp_path, arch):
    model = _random_model(arch)
    path = str(tmp_path / "m.gguf")
    write_gguf(path, model, arch, extra_uint32=_TOKEN_IDS)
    assert gguf_architecture(path) == arch
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert type(hf).__name__ == type(model).__name__

    # Weight level first: a wrong name map fails here with the tensor's name.
    reference = hf.state_dict()
    for name, tensor in iter_weights(resolve_model(path), torch.float32):
        assert torch.equal(tensor, reference[name]), name

    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (2, 9, 30)]
    llm = LLM(path, skip_tokenizer_init=True, max_num_batched_tokens=16, quiet=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        theirs, _ = hf_greedy(hf, prompt, 12)
        ours = out.outputs[0].token_ids
        assert ours == theirs, f"{arch}: prompt of {len(prompt)} tokens diverges at {first_divergence(ours, theirs)}"


def test_phi3_fused_names_and_rope_factor_tensors():
    from pagellm.loader.gguf import gguf_to_hf_name

    assert gguf_to_hf_name("blk.3.attn_qkv.weight", "phi3") == "model.layers.3.self_attn.qkv_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_up.weight", "phi3") == "model.layers.3.mlp.gate_up_proj.weight"
    assert gguf_to_hf_name("blk.3.ffn_up.weight", "qwen2") == "model.layers.3.mlp.up_proj.weight"
    # Longrope factors are recomputed from the config, like llama3's rope_freqs.
    assert gguf_to_hf_name("rope_factors_long.weight", "phi3") is None
    assert gguf_to_hf_name("rope_factors_short.weight", "phi3") is None
    with pytest.raises(ValueError, match="ffn_gate"):
        gguf_to_hf_name("blk.0.ffn_gate.weight", "phi3")  # Phi-3 has no separate gate tensor
