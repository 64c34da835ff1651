"""Architecture name (HF `architectures` / GGUF `general.architecture`) -> model class."""

from __future__ import annotations

from torch import nn

from pagellm.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}
# Configs built from GGUF metadata may carry only a model_type.
_MODEL_TYPES: dict[str, str] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(config) -> type[nn.Module]:
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        names = [_MODEL_TYPES[model_type]]
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    raise ValueError(
        f"unsupported model architecture {names or model_type!r}; supported: {', '.join(supported_architectures())}"
    )
