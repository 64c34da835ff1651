"""Model loading: where a model lives, its config, its weights (HF safetensors or GGUF), its tokenizer."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pagellm.loader.dummy import dummy_source, initialize_dummy_weights
from pagellm.loader.gguf import gguf_architecture, iter_gguf_weights
from pagellm.loader.hf import iter_safetensors_weights, load_hf_config
from pagellm.loader.source import ModelSource, default_model_path, gemma3_270m_path, resolve_model
from pagellm.loader.tokenizer import load_tokenizer


def iter_weights(source: ModelSource, dtype: torch.dtype, quantization: str = "none",
                 lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor in `dtype`), one tensor at a time.

    quantization="auto" keeps a GGUF file's linear weights quantized (`GGUFQuantizedTensor`s in
    place of tensors, see loader/gguf.py); "none" dequantizes everything. Safetensors checkpoints
    are not quantized, so both modes load them the same. lazy=True (tensor-parallel ranks) yields
    safetensors entries as `LazyTensor`s, read only where a layer cuts its part (GGUF tensors are
    read whole; quantized ones are cut as blocks).

    Names follow Hugging Face ("model.layers.3.self_attn.q_proj.weight", ...). lm_head.weight
    appears only when the checkpoint stores it (tied embeddings usually do not).
    """
    if source.kind == "gguf":
        assert source.gguf_path is not None
        return iter_gguf_weights(source.gguf_path, dtype, quantization)
    return iter_safetensors_weights(source.path, dtype, lazy)


def resolve_model_source(model: str, load_format: str = "auto") -> ModelSource:
    """`resolve_model`, except that with load_format="dummy" a directory holding only config.json will do."""
    if load_format == "dummy":
        return dummy_source(model)
    return resolve_model(model)


__all__ = [
    "ModelSource",
    "default_model_path",
    "dummy_source",
    "initialize_dummy_weights",
    "gemma3_270m_path",
    "gguf_architecture",
    "iter_weights",
    "load_hf_config",
    "load_tokenizer",
    "resolve_model",
    "resolve_model_source",
]
