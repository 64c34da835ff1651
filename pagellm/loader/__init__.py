"""Model loading: where a model lives, its config, its weights (HF safetensors or GGUF), its tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Union

import torch

from pagellm.loader.dummy import dummy_source, initialize_dummy_weights
from pagellm.loader.gguf import gguf_architecture, iter_gguf_weights
from pagellm.loader.hf import iter_safetensors_weights, load_hf_config, safetensors_files
from pagellm.loader.source import ModelSource, default_model_path, gemma3_270m_path, resolve_model
from pagellm.loader.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from pagellm.layers.quantization.registry import QuantizationPlan


def iter_weights(source: ModelSource, dtype: torch.dtype, quantization: Union[str, "QuantizationPlan"] = "none",
                 lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor in `dtype`), one tensor at a time.

    `quantization`, a plan (registry.plan_quantization) or the `--quantization` value to plan
    from (on the CPU), says what stays quantized: a GGUF
    file's linear weights (`GGUFQuantizedTensor`s in place of tensors, see loader/gguf.py), or a
    quantized safetensors checkpoint's (`QuantizedWeight`s, see loader/quantized.py); with
    method "none" or `plan.dequantize` everything is dequantized. lazy=True (tensor-parallel
    ranks) yields plain safetensors entries as `LazyTensor`s, read only where a layer cuts its
    part (GGUF tensors and quantized weights are read whole and cut as blocks / groups).

    Names follow Hugging Face ("model.layers.3.self_attn.q_proj.weight", ...). lm_head.weight
    appears only when the checkpoint stores it (tied embeddings usually do not).
    """
    from pagellm.layers.quantization.registry import plan_quantization  # not at import: front ends import the loader

    plan = quantization
    if isinstance(quantization, str):
        quant_config = None if source.kind == "gguf" else getattr(load_hf_config(source), "quantization_config", None)
        plan = plan_quantization(quantization, source.kind, quant_config)
    if source.kind == "gguf":
        assert source.gguf_path is not None
        keep = plan.method == "gguf"
        return iter_gguf_weights(source.gguf_path, dtype, "auto" if keep else "none", device=plan.device)
    if plan.checkpoint is not None:
        from pagellm.loader.quantized import iter_quantized_safetensors  # imports torch-side format code

        return iter_quantized_safetensors(safetensors_files(source.path), dtype, plan.checkpoint,
                                          dequantize=plan.dequantize, lazy=lazy)
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
