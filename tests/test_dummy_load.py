"""load_format="dummy": random weights from a directory holding only config.json."""

from __future__ import annotations

import os

import pytest
import torch

from pagellm.config import EngineConfig
from pagellm.engine.core import EngineCore, EngineCoreRequest
from pagellm.engine.setup import ModelSetup, text_config
from pagellm.loader import load_hf_config, resolve_model, resolve_model_source
from pagellm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = str(tmp_path_factory.mktemp("llama-config-only"))
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False).save_pretrained(path)
    assert sorted(os.listdir(path)) == ["config.json"]  # no weights, no tokenizer
    return path


def dummy_core(path: str, seed: int = 0) -> EngineCore:
    # Unpacked weights: the test reads the plain parameters the dummy init wrote.
    config = EngineConfig(model=path, load_format="dummy", seed=seed, device="cpu", max_model_len=256,
                          kv_cache_memory=4 << 20, cpu_weight_prepack=False)
    source = resolve_model_source(path, config.load_format)
    model_config = text_config(load_hf_config(source))
    setup = ModelSetup(config.resolve(model_max_len=512, cuda_available=False), source, model_config)
    return EngineCore.from_config(setup, quiet=True)


def greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(EngineCoreRequest(str(i), ids, params))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for update in core.step():
            out[update.req_id].extend(update.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def test_config_only_dir_needs_dummy(config_dir):
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(config_dir)
    assert resolve_model_source(config_dir, "dummy").kind == "hf"
    with pytest.raises(ValueError, match="load_format='dummy' needs a model directory with a config.json"):
        resolve_model_source(os.path.dirname(config_dir), "dummy")


def test_dummy_weights_generate_deterministically(config_dir):
    core = dummy_core(config_dir, seed=0)
    params = dict(core.runner.model.named_parameters())
    norms = [p for n, p in params.items() if p.dim() == 1]  # this config has no biases
    assert norms and all(torch.equal(n, torch.ones_like(n)) for n in norms)
    name, q = next((n, p) for n, p in params.items() if p.dim() == 2 and "embed" not in n)
    assert 0.015 < q.std().item() < 0.025 and abs(q.mean().item()) < 0.005
    prompts = [[5, 17, 42, 99, 3], list(range(10, 60))]
    first = greedy(core, prompts)
    assert [len(t) for t in first] == [8, 8]
    assert all(0 <= t < 300 for seq in first for t in seq)
    assert greedy(dummy_core(config_dir, seed=0), prompts) == first  # same seed, same weights, same tokens
    other = dict(dummy_core(config_dir, seed=1).runner.model.named_parameters())
    assert not torch.equal(other[name], q)


def test_llama_8b_benchmark_config():
    """configs/llama-3.1-8b: the shape the GPU benchmarks run with dummy weights."""
    from pagellm.worker.kv_cache import kv_bytes_per_token

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = resolve_model_source(os.path.join(root, "configs", "llama-3.1-8b"), "dummy")
    config = load_hf_config(source)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == \
        (4096, 32, 8, 128256)
    assert kv_bytes_per_token(config, torch.bfloat16) == 128 * 1024


def test_llm_with_dummy_weights_and_token_prompts(config_dir):
    from pagellm import LLM

    llm = LLM(config_dir, load_format="dummy", skip_tokenizer_init=True, device="cpu", max_model_len=256,
              kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 10]}], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    # The engine path must give the same tokens as driving the core directly with the same seed.
    assert [o.outputs[0].token_ids for o in outs] == greedy(dummy_core(config_dir), [[5, 6, 7, 8], [9, 10]], 6)
