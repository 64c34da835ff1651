"""Architecture name (HF `architectures` / GGUF `general.architecture`) -> model class.

Classes are imported when first asked for, so one architecture's module (or a missing optional
one) never stops the others from loading.
"""

from __future__ import annotations

import importlib

from torch import nn

# HF architecture name -> (module, class)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("pagellm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagellm.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagellm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagellm.models.qwen3", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("pagellm.models.phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("pagellm.models.mixtral", "MixtralForCausalLM"),
    "Gemma3ForCausalLM": ("pagellm.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("pagellm.models.gemma3", "Gemma3ForCausalLM"),  # its text model
}
# Configs built from GGUF metadata may carry only a model_type.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(config) -> type[nn.Module]:
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        names = [_MODEL_TYPES[model_type]]
    for name in names:
        if name in _ARCHITECTURES:
            module, cls = _ARCHITECTURES[name]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"unsupported model architecture {names or model_type!r}; supported: {', '.join(supported_architectures())}"
    )
