"""Layout checks an executor runs before it starts any rank process: a layout the model or the
machine cannot run fails at once with the numbers, instead of in every rank after a spawn."""

from __future__ import annotations

import logging

from pagellm.distributed.layout import attention_head_layout, expert_range

logger = logging.getLogger(__name__)


def check_parallel_layout(model_config, tp_size: int, expert_parallel: bool = False, device: str = "cpu",
                          cuda_device_count: int = 0, pipeline_parallel_size: int = 1) -> bool:
    """Raises ValueError naming the field and the numbers; returns whether expert parallelism applies
    (False, with a warning, for a dense model: the flag is ignored there, as in vLLM)."""
    ranks = tp_size * pipeline_parallel_size
    if device.startswith("cuda") and ranks > cuda_device_count:
        raise ValueError(f"tensor_parallel_size ({tp_size}) x pipeline_parallel_size ({pipeline_parallel_size}) "
                         f"= {ranks} ranks is more than the {cuda_device_count} CUDA devices this machine has "
                         f"(one device per rank)")
    heads = model_config.num_attention_heads
    attention_head_layout(heads, getattr(model_config, "num_key_value_heads", None) or heads, tp_size)
    num_experts = getattr(model_config, "num_local_experts", None)
    use_ep = bool(expert_parallel and num_experts and tp_size > 1)
    if expert_parallel and not num_experts:
        logger.warning("enable_expert_parallel is ignored: %s has no experts (a dense model)",
                       getattr(model_config, "architectures", None) or type(model_config).__name__)
    if use_ep:
        expert_range(num_experts, 0, tp_size)
    inter = getattr(model_config, "intermediate_size", None)
    if inter is not None and not use_ep and inter % tp_size:
        raise ValueError(f"intermediate_size ({inter}) is not divisible by tensor_parallel_size ({tp_size})")
    # The vocabulary is padded to a multiple of tp_size, so it never constrains the layout.
    return use_ep
