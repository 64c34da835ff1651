"""The executor interface the engine core talks to, and the start-up sequence every executor shares.

An executor owns one or more workers and reaches them through `collective_rpc(method, args)`,
which calls `Worker.<method>(*args)` on every worker and returns their results in rank order.
Start-up is the same whatever the workers are: each reports how many KV blocks its device
holds, the engine takes the minimum (every worker must hold every block), checks that one
max_model_len request fits, has every worker allocate that many, then warms them up (CUDA graphs).
A multi-process, tensor/pipeline-parallel or Ray executor only supplies `collective_rpc` and
`execute` (where the driver worker's output is the step's output).

Pipeline parallelism keeps several steps in flight: `max_concurrent_batches` (the pp size) says
how many the engine core may queue, and `execute_async(sched)` starts a step and returns a
`StepFuture` whose `result()` blocks for its output (the last stage's). Futures resolve in the
order the steps were started. The default runs the step at once (a done future), so an
executor that does not pipeline needs nothing more; with one batch in flight the core never
calls it and steps through `execute` as before.
"""

from __future__ import annotations

import abc
import logging
from concurrent.futures import Future
from typing import Any, Optional, Protocol

from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerOutput
from pagellm.worker.kv_cache import check_kv_capacity, kv_cache_summary
from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


class RankFailure(RuntimeError):
    """A rank (process or Ray actor) died or raised; the executor cannot run another step."""


class StepFuture(Protocol):
    """A started step: `result()` blocks until its ModelRunnerOutput is there (or raises the step's error)."""

    def result(self) -> ModelRunnerOutput: ...


class Executor(abc.ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.world_size
        # The rank whose output is the step's: tp rank 0 of the last pipeline stage.
        self.output_rank = (config.pipeline_parallel_size - 1) * config.tensor_parallel_size
        self.num_blocks = 0
        self.kv_cache_summary = ""  # the start-up line, once initialize() has run

    @staticmethod
    def create(setup) -> "Executor":
        """The executor for a resolved `ModelSetup`; the one place the backend (uni, mp, ray) is chosen."""
        from pagellm.distributed.pipeline import stage_layer_counts
        from pagellm.distributed.startup_checks import check_parallel_layout
        from pagellm.executor.uniproc import UniprocExecutor

        config = setup.config
        if config.executor_backend() == "uni":
            if config.enable_expert_parallel:
                logger.warning("enable_expert_parallel is ignored with one rank")
            return UniprocExecutor(setup)
        import torch

        ray = config.executor_backend() == "ray"
        # Checked before any process starts, so a bad layout fails at once and names the numbers. Ray
        # ranks use the cluster's devices, not this machine's: its placement group checks those.
        cuda_devices = torch.cuda.device_count() if config.device.startswith("cuda") else 0
        check_parallel_layout(setup.model_config, config.tensor_parallel_size, config.enable_expert_parallel,
                              config.device, config.world_size if ray else cuda_devices,
                              pipeline_parallel_size=config.pipeline_parallel_size)
        stage_layer_counts(setup.model_config.num_hidden_layers, config.pipeline_parallel_size)
        if ray:
            from pagellm.executor.ray_executor import RayExecutor

            return RayExecutor(setup)
        from pagellm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(setup)

    @abc.abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None) -> list[Any]:
        """`Worker.<method>(*args, **kwargs)` on every worker; the results in rank order."""

    @abc.abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step on the workers; the driver worker's output."""

    @property
    def max_concurrent_batches(self) -> int:
        """Steps the engine core may have in flight at once: one per pipeline stage."""
        return self.config.pipeline_parallel_size

    def execute_async(self, sched: SchedulerOutput) -> StepFuture:
        """Starts one step; its output comes from the returned future. By default the step runs now."""
        future: Future = Future()
        try:
            future.set_result(self.execute(sched))
        except Exception as exc:  # noqa: BLE001 - raised again by result(), like a remote step's error
            future.set_exception(exc)
        return future

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
        storage, model_dtype_per_token = self.config.dtype, 0
        if self.config.kv_cache_dtype != "auto":
            storage = self.config.kv_cache_dtype
            model_dtype_per_token = sum(self.collective_rpc("kv_bytes_per_token", (True,)))
        message = kv_cache_summary(num_blocks, self.config.block_size, self.config.max_model_len, per_token,
                                   storage, model_dtype_per_token)
        graph_summary = self.collective_rpc("compile_or_warm_up_model")[0]
        if graph_summary:
            message += "\n" + graph_summary
        logger.info(message)
        self.num_blocks = num_blocks
        self.kv_cache_summary = message
        return num_blocks

    def shutdown(self) -> None:
        self.collective_rpc("shutdown")
