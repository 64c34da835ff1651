"""The collectives layers use, all in one place (the CUDA path — NCCL, a custom all-reduce,
graph capture — changes only this file). Each is a no-op at tp_size 1."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context


def _ctx(ctx: Optional[ParallelContext]) -> ParallelContext:
    return ctx if ctx is not None else get_parallel_context()


def tensor_parallel_all_reduce(x: torch.Tensor, ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """The sum of `x` over the tensor-parallel ranks (in place when it can)."""
    ctx = _ctx(ctx)
    if ctx.tp_size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=ctx.tp_group)
    return x


def tensor_parallel_all_gather(x: torch.Tensor, dim: int = -1, ctx: Optional[ParallelContext] = None) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, rank order (same shape on every rank)."""
    ctx = _ctx(ctx)
    if ctx.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj: Any, src: int = 0, ctx: Optional[ParallelContext] = None) -> Any:
    """`obj` from tensor-parallel rank `src` (a group rank), on every rank of the group."""
    ctx = _ctx(ctx)
    if ctx.tp_size == 1:
        return obj
    box = [obj if ctx.tp_rank == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.tp_group, src), group=ctx.tp_group)
    return box[0]
