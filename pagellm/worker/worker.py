"""A worker: one device, the model runner on it, and its shard of the KV cache.

Every method an executor calls on its workers (through `collective_rpc`) is a plain method
here taking and returning picklable values, so a worker can live in this process, another
process, or a Ray actor without changing its interface. With tensor or pipeline parallelism a
worker holds its shard: its pipeline stage's layers, and of those its tensor-parallel heads/columns.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from pagellm.attention.kv_quant import KVCacheFormat
from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerOutput
from pagellm.distributed.parallel_state import get_parallel_context
from pagellm.layers.quantization.registry import plan_quantization
from pagellm.loader import ModelSource, iter_weights
from pagellm.worker import kv_cache
from pagellm.worker.model_loader import DTYPES
from pagellm.worker.model_runner import ModelRunner
from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, model_config, rank: int = 0) -> None:
        self.config = config
        self.model_config = model_config
        self.rank = rank
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.kv_format = KVCacheFormat.from_config(config.kv_cache_dtype, self.dtype)
        self.model_runner: Optional[ModelRunner] = None
        self.kv_caches: list[torch.Tensor] = []
        self.parallel = get_parallel_context()  # the rank's context (it is built inside it)

    def load_model(self, source: Optional[ModelSource]) -> None:
        # Dummy weights are random: no checkpoint is read.
        # A tensor-parallel rank reads only its part of each safetensors tensor.
        lazy = self.parallel.tp_size > 1
        plan = None
        if source is not None and self.config.load_format != "dummy":
            plan = plan_quantization(self.config.quantization, source.kind,
                                     getattr(self.model_config, "quantization_config", None), self.config.device)
        weights = None if plan is None else iter_weights(source, self.dtype, plan, lazy=lazy)
        self.model_runner = ModelRunner.load(self.config, self.model_config, weights,
                                             online=None if plan is None else plan.online)

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (its shard under tensor parallelism)."""
        from pagellm.worker.model_loader import model_weight_bytes

        return model_weight_bytes(self.model_runner.model)

    def parallel_layout(self) -> dict:
        """This rank's place in the layout (for logs and tests)."""
        ctx = self.parallel
        return {"tp_rank": ctx.tp_rank, "tp_size": ctx.tp_size, "expert_parallel": ctx.expert_parallel}

    def quantized_linear_count(self) -> int:
        """Layers whose weight this rank holds as quantized blocks."""
        from pagellm.layers.quantization.base import QuantizedLinearMethod

        return sum(1 for m in self.model_runner.model.modules()
                   if getattr(m, "qweight", None) is not None
                   or (isinstance(getattr(m, "method", None), QuantizedLinearMethod) and not m.method.dense))

    def kv_bytes_per_token(self, model_dtype: bool = False) -> int:
        """Bytes per token of this rank's cache (scales included); `model_dtype`: what an
        unquantized cache would take instead."""
        kv_format = KVCacheFormat("auto", self.dtype) if model_dtype else self.kv_format
        if self.model_runner is None:
            return kv_cache.kv_bytes_per_token(self.model_config, self.dtype, kv_format)
        # From the built layers: with tensor parallelism a rank holds only its KV-head shard.
        return kv_cache.model_kv_bytes_per_token(self.model_runner.model, self.dtype, kv_format)

    def determine_num_blocks(self) -> int:
        """KV blocks this worker's device can hold: from the CUDA profile, or the CPU budget."""
        per_block = self.kv_bytes_per_token() * self.config.block_size
        if self.device.type == "cuda":
            runner = self.model_runner
            runner.memory_profile = runner.profile_cuda_memory()
            return kv_cache.blocks_from_profile(runner.memory_profile, self.config, per_block)
        return kv_cache.blocks_from_budget(self.config.kv_cache_memory, per_block)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        runner = self.model_runner
        self.kv_caches = kv_cache.allocate_kv_cache(runner.model, runner.backend, num_blocks, self.config.block_size,
                                                    self.dtype, self.device, self.kv_format)
        runner.num_blocks = num_blocks

    def compile_or_warm_up_model(self) -> str:
        """Captures the decode CUDA graphs (CUDA only, unless enforce_eager); their start-up line, or ''."""
        self.model_runner.capture_cuda_graphs()
        return self.model_runner.graph_summary

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute(sched)

    def shutdown(self) -> None:
        self.kv_caches = []
