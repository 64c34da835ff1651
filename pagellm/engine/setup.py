"""Start-up resolution shared by the front end and the engine core: which files, which
model config, and the final frozen EngineConfig (model-dependent defaults filled in)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.config import EngineConfig
from pagellm.quantization_rules import choose_quantization
from pagellm.loader import ModelSource, default_model_path, load_hf_config, resolve_model_source


@dataclass(frozen=True)
class ModelSetup:
    config: EngineConfig  # resolved
    source: ModelSource
    model_config: object  # transformers PretrainedConfig of the text model

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size


def text_config(hf_config):
    """Multimodal wrappers keep the language model's settings in `text_config`."""
    inner = getattr(hf_config, "text_config", None)
    if inner is not None and getattr(hf_config, "model_type", "") not in ("llama",):
        if not getattr(inner, "architectures", None):
            inner.architectures = list(getattr(hf_config, "architectures", None) or [])
        return inner
    return hf_config


def resolve_setup(config: EngineConfig) -> ModelSetup:
    source = resolve_model_source(config.model or default_model_path(), config.load_format)
    model_config = text_config(load_hf_config(source))
    max_len = getattr(model_config, "max_position_embeddings", None) or 2048
    cuda = torch.cuda.is_available()
    # The front end checks dp x tp x pp against the devices; each core's executor checks its own slice.
    count = torch.cuda.device_count() if cuda and config.data_parallel_size > 1 else None
    resolved = config.resolve(model_max_len=max_len, cuda_available=cuda, cuda_device_count=count)
    if resolved.load_format != "dummy":  # a mismatch with the checkpoint fails here, before any worker starts
        choose_quantization(resolved.quantization, source.kind, getattr(model_config, "quantization_config", None),
                          resolved.device)
    return ModelSetup(resolved, source, model_config)
