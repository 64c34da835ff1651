"""The executor interface the engine core talks to, and the start-up sequence every executor shares.

An executor owns one or more workers and reaches them through `collective_rpc(method, args)`,
which calls `Worker.<method>(*args)` on every worker and returns their results in rank order.
Start-up is the same whatever the workers are: each reports how many KV blocks its device
holds, the engine takes the minimum (every worker must hold every block), checks that one
max_model_len request fits, has every worker allocate that many, then warms them up (CUDA graphs).
A multi-process, tensor/pipeline-parallel or Ray executor only supplies `collective_rpc` and
`execute` (where the driver worker's output is the step's output).
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Optional

from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerOutput
from pagellm.worker.kv_cache import check_kv_capacity, kv_cache_summary
from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


class Executor(abc.ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.num_blocks = 0
        self.kv_cache_summary = ""  # the start-up line, once initialize() has run

    @staticmethod
    def create(setup) -> "Executor":
        """The executor for a resolved `ModelSetup`; the one place a distributed backend would be chosen."""
        from pagellm.distributed.startup_checks import check_parallel_layout
        from pagellm.executor.uniproc import UniprocExecutor

        config = setup.config
        if config.executor_backend() == "uni":
            if config.enable_expert_parallel:
                logger.warning("enable_expert_parallel is ignored with one rank")
            return UniprocExecutor(setup)
        import torch

        from pagellm.executor.multiproc import MultiprocExecutor

        # Checked before any process starts, so a bad layout fails at once and names the numbers.
        cuda_devices = torch.cuda.device_count() if config.device.startswith("cuda") else 0
        check_parallel_layout(setup.model_config, config.tensor_parallel_size, config.enable_expert_parallel,
                              config.device, cuda_devices)
        return MultiprocExecutor(setup)

    @abc.abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        """`Worker.<method>(*args, **kwargs)` on every worker; the results in rank order."""

    @abc.abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on the workers; the driver worker's output."""

    @property
    def driver_worker(self):
        """The worker in this process that produces the step's output, or None when all are remote."""
        return None

    def initialize(self) -> int:
        """Sizes, checks and allocates the KV cache on every worker, then warms them up; returns the block count."""
        per_rank = self.collective_rpc("determine_num_blocks")
        num_blocks = min(per_rank)
        if len(per_rank) > 1:
            logger.info("KV blocks per rank %s -> %d", per_rank, num_blocks)
        check_kv_capacity(num_blocks, self.config.block_size, self.config.max_model_len)
        self.collective_rpc("initialize_kv_cache", (num_blocks,))
        # Each worker holds its shard of the layers or heads, so a token costs the sum over workers.
        per_token = sum(self.collective_rpc("kv_bytes_per_token"))
        message = kv_cache_summary(num_blocks, self.config.block_size, self.config.max_model_len, per_token)
        graph_summary = self.collective_rpc("compile_or_warm_up_model")[0]
        if graph_summary:
            message += "\n" + graph_summary
        logger.info(message)
        self.num_blocks = num_blocks
        self.kv_cache_summary = message
        return num_blocks

    def shutdown(self) -> None:
        self.collective_rpc("shutdown")
