"""Builds a worker's model: the architecture for the config, its weights (checkpoint or dummy),
then the CPU-only switches (oneDNN weight prepacking, the C++ norm/activation kernels)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Optional

import torch

from pagellm.config import EngineConfig
from pagellm.layers.linear import cpu_prepack_available, prepack_cpu_weights, quantize_linear_layers
from pagellm.layers.quantization.base import OnlineQuantization
from pagellm.layers.quantization.gguf import tile_gguf_weights
from pagellm.layers.utils import call_on_layers
from pagellm.loader.dummy import initialize_dummy_weights
from pagellm.models.registry import get_model_class
from pagellm.ops.cpu import enable_cpu_kernels, load_cpu_ops
from pagellm.ops.gguf_cpu import load_gguf_ops

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(config: EngineConfig, model_config, weights: Optional[Iterable],
               online: Optional[OnlineQuantization] = None) -> torch.nn.Module:
    """The model for `model_config`, filled from `weights` (HF-named tensors), on `config.device`, in eval mode.

    Quantized weights arrive as such from `weights`; `online` quantizes the dense linear weights
    after loading (`--quantization fp8 | int8`). Every layer's `process_after_loading` then runs
    on the device (repacking quantized weights for its kernels).

    With `load_format="dummy"` the weights are random (seeded by `config.seed`) and `weights`
    is not read (it may be None): benchmarks of large shapes without checkpoint files.
    """
    model_cls = get_model_class(model_config)
    dtype = DTYPES[config.dtype]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    dummy = config.load_format == "dummy"
    try:
        # Dummy weights are built and filled on the device: an 8B model's random init takes
        # seconds there, minutes on the CPU, and never needs a CPU copy.
        with torch.device(config.device) if dummy else contextlib.nullcontext():
            model = model_cls(model_config, config.max_model_len)
    finally:
        torch.set_default_dtype(previous)
    if dummy:
        model = model.eval()
        initialize_dummy_weights(model, config.seed)
    else:
        model.load_weights(weights)
        if online is not None:
            logger.info("quantized %d linear layers online (%s)", quantize_linear_layers(model, online), online.name)
        model = model.to(torch.device(config.device)).eval()
        call_on_layers(model, "process_after_loading")
    if config.device == "cpu":
        apply_cpu_switches(model, config)
    return model


def apply_cpu_switches(model: torch.nn.Module, config: EngineConfig) -> None:
    """oneDNN-prepacked linear weights and the C++ kernels, each when the config asks and the build allows."""
    dtype = DTYPES[config.dtype]
    if config.cpu_weight_prepack:
        if cpu_prepack_available(dtype):
            logger.info("prepacked %d linear layers for oneDNN", prepack_cpu_weights(model))
        else:
            logger.warning("cpu_weight_prepack: oneDNN cannot pack %s weights with this torch build and CPU; "
                           "using plain matmuls", config.dtype)
    if config.cpu_gguf_tiles and load_gguf_ops():
        logger.info("GGUF weights of %d linear layers in 16-row tiles", sum(tile_gguf_weights(model)))
    if config.cpu_int8_activations:
        call_on_layers(model, "enable_int8_activations")
        logger.info("int8 decode activations on for the layers with GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks "
                    "(GPTQ/AWQ/pack-quantized weights included: they are repacked into Q4_0/Q8_0)")
    if config.cpu_fused_ops and load_cpu_ops():
        logger.info("C++ CPU kernels for %d norm/activation/rotary layers", enable_cpu_kernels(model))


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this process holds (parameters, buffers such as GGUF blocks, oneDNN
    packed copies), each storage counted once: under tensor parallelism, about 1/tp of the model."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m.packed for m in model.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
