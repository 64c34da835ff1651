"""The parallel context: which tensor-parallel rank this process is and the group it talks through.

Besides the forward context this is the only ambient state. An executor creates the process
groups once per rank (`init_parallel`) and builds the model inside `set_parallel_context(ctx)`;
layers read the context when they are constructed and keep it, so the forward pass does not
need the context to be set. Without a context everything is single-process (tp_size 1).
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
    # Pipeline and data parallel fields come with those features; this rank's global rank for logs.
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")
        if self.tp_size > 1 and self.tp_group is None:
            raise ValueError(f"tp_size {self.tp_size} needs a tp_group (create it with init_parallel)")


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
                  init_method: str = "env://") -> ParallelContext:
    """Joins the default process group and creates the tensor-parallel groups (consecutive ranks
    form one group); returns this rank's context. Every rank must call it with the same sizes."""
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(f"world_size {world_size} is not a multiple of tensor_parallel_size {tp_size}")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)
    group = None
    for start in range(0, world_size, tp_size):
        # new_group must be called by every rank for every group, in the same order.
        g = dist.new_group(list(range(start, start + tp_size)), backend=backend)
        if start <= rank < start + tp_size:
            group = g
    return ParallelContext(tp_rank=rank % tp_size, tp_size=tp_size, tp_group=group if tp_size > 1 else None,
                           rank=rank, world_size=world_size)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
