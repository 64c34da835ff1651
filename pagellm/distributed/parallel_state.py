"""The parallel context: which tensor- and pipeline-parallel rank this process is, and its groups.

Besides the forward context this is the only ambient state. An executor creates the process
groups once per rank (`init_parallel`) and builds the model inside `set_parallel_context(ctx)`;
layers read the context when they are constructed and keep it, so the forward pass does not
need the context to be set. Without a context everything is single-process (tp 1, pp 1).

Rank layout (vLLM's): global rank = pp_rank * tp_size + tp_rank, so a tensor-parallel group is
`tp_size` consecutive ranks and a pipeline stage's next stage is `tp_size` ranks further on.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Optional[Any] = None  # torch.distributed ProcessGroup; None when tp_size == 1
    pp_rank: int = 0
    pp_size: int = 1
    pp_group: Optional[Any] = None  # this tp_rank's ranks across the stages; None when pp_size == 1
    rank: int = 0  # global rank (pp_rank * tp_size + tp_rank)
    world_size: int = 1
    expert_parallel: bool = False  # MoE layers place whole experts on the tp ranks (EngineConfig.enable_expert_parallel)

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            size, rank, group = getattr(self, f"{name}_size"), getattr(self, f"{name}_rank"), getattr(self, f"{name}_group")
            if size < 1:
                raise ValueError(f"{name}_size must be >= 1, got {size}")
            if not 0 <= rank < size:
                raise ValueError(f"{name}_rank {rank} is outside [0, {size})")
            if size > 1 and group is None:
                raise ValueError(f"{name}_size {size} needs a {name}_group (create it with init_parallel)")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


SINGLE_PROCESS = ParallelContext()

_CURRENT: contextvars.ContextVar[ParallelContext] = contextvars.ContextVar(
    "pagellm_parallel_context", default=SINGLE_PROCESS)


def get_parallel_context() -> ParallelContext:
    return _CURRENT.get()


@contextlib.contextmanager
def set_parallel_context(ctx: ParallelContext) -> Iterator[ParallelContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def init_parallel(world_size: int, rank: int, tp_size: int, backend: str = "gloo",
                  init_method: str = "env://", pp_size: int = 1,
                  expert_parallel: bool = False) -> ParallelContext:
    """Joins the default process group and creates the tensor- and pipeline-parallel groups;
    returns this rank's context. Every rank must call it with the same sizes."""
    if tp_size < 1 or pp_size < 1 or world_size != tp_size * pp_size:
        raise ValueError(f"world_size {world_size} is not tensor_parallel_size {tp_size} x "
                         f"pipeline_parallel_size {pp_size}")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    # new_group must be called by every rank for every group, in the same order.
    tp_group = pp_group = None
    for start in range(0, world_size, tp_size):
        ranks = list(range(start, start + tp_size))
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            tp_group = g
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world_size, tp_size))
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            pp_group = g
    return ParallelContext(tp_rank=rank % tp_size, tp_size=tp_size, tp_group=tp_group if tp_size > 1 else None,
                           pp_rank=rank // tp_size, pp_size=pp_size, pp_group=pp_group if pp_size > 1 else None,
                           rank=rank, world_size=world_size, expert_parallel=expert_parallel and tp_size > 1)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
