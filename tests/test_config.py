"""EngineConfig validation and LLM(**kwargs) plumbing."""

from __future__ import annotations

import pytest

from pagellm import LLM, EngineConfig
from pagellm.config import DEFAULT_MAX_MODEL_LEN_CAP


@pytest.mark.parametrize("kwargs, field", [
    (dict(dtype="float8"), "dtype"), (dict(device="tpu"), "device"), (dict(block_size=12), "block_size"),
    (dict(block_size=0), "block_size"), (dict(kv_cache_memory=0), "kv_cache_memory"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"), (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=4096, max_num_batched_tokens=512, enable_chunked_prefill=False), "max_num_batched_tokens"),
    (dict(seed="x"), "seed"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**kwargs)


def test_resolve_fills_defaults():
    cfg = EngineConfig().resolve(model_max_len=100_000, cuda_available=False)
    assert (cfg.device, cfg.dtype, cfg.max_model_len) == ("cpu", "float32", DEFAULT_MAX_MODEL_LEN_CAP)
    assert cfg.max_num_batched_tokens == 2048 and cfg.kv_cache_memory > 0
    assert EngineConfig(enable_chunked_prefill=False).resolve(model_max_len=512, cuda_available=False).max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=9000).resolve(model_max_len=8192, cuda_available=False)
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="cuda").resolve(model_max_len=512, cuda_available=False)
    with pytest.raises(Exception):
        cfg.block_size = 32  # frozen


def test_llm_rejects_unknown_kwargs():
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(max_num_sequences=4)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True, quiet=True)
