"""What every multi-rank executor does in a rank's process before serving calls: pick the
device, join the process groups, and build this rank's shard of the model inside its parallel
context. Shared by the mp executor (spawned processes) and the Ray executor (actors)."""

from __future__ import annotations

import dataclasses

import torch

from pagellm.distributed.parallel_state import ParallelContext, init_parallel, set_parallel_context
from pagellm.worker.worker import Worker


def distributed_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_rank_worker(rank: int, setup, init_method: str, local_device: int = 0,
                     threads_per_rank: int = 0) -> tuple[Worker, ParallelContext]:
    """This rank's loaded Worker and its parallel context. `local_device` is the CUDA device index on
    this rank's machine; `threads_per_rank` (CPU) caps torch's threads so co-located ranks do not
    oversubscribe the cores (0: the machine's threads split evenly over the world)."""
    config = setup.config
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if config.device == "cuda":
        torch.cuda.set_device(local_device)
        config = dataclasses.replace(config, device=f"cuda:{local_device}")
    else:
        torch.set_num_threads(threads_per_rank or max(1, torch.get_num_threads() // (tp * pp)))
    ctx = init_parallel(tp * pp, rank, tp, backend=distributed_backend(config.device), init_method=init_method,
                        pp_size=pp, expert_parallel=config.enable_expert_parallel)
    with set_parallel_context(ctx):  # layers read the context while they are built
        worker = Worker(config, setup.model_config, rank=rank)
        worker.load_model(setup.source)
    return worker, ctx
