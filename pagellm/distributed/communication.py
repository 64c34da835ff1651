"""The collectives layers use, all in one place (the CUDA path — NCCL, a custom all-reduce,
graph capture — changes only this file). Each tensor-parallel one is a no-op at tp_size 1.

Pipeline parallelism sends a stage's outputs (hidden states, residual) point to point to the
same tp rank of the next stage, over the pp group; the receiver knows the shapes beforehand
(tokens in the step x hidden size), so only the data travels."""

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


def _stage_peer(ctx: ParallelContext, pp_rank: int) -> int:
    """The global rank of this tp rank's peer on stage `pp_rank`."""
    return dist.get_global_rank(ctx.pp_group, pp_rank)


def pp_send_tensors(tensors: dict[str, torch.Tensor], ctx: Optional[ParallelContext] = None) -> None:
    """Sends `tensors` (in key order) to the next pipeline stage; blocks until they are handed over."""
    ctx = _ctx(ctx)
    if ctx.is_last_stage:
        raise ValueError(f"pipeline stage {ctx.pp_rank} of {ctx.pp_size} is the last; it has no next stage")
    dst = _stage_peer(ctx, ctx.pp_rank + 1)
    for name in sorted(tensors):
        dist.send(tensors[name].contiguous(), dst=dst, group=ctx.pp_group)


def pp_recv_tensors(names: tuple[str, ...], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    ctx: Optional[ParallelContext] = None) -> dict[str, torch.Tensor]:
    """Receives from the previous pipeline stage the tensors `pp_send_tensors` sent there, each of `shape`."""
    ctx = _ctx(ctx)
    if ctx.is_first_stage:
        raise ValueError("the first pipeline stage has no previous stage to receive from")
    src = _stage_peer(ctx, ctx.pp_rank - 1)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        out[name] = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out[name], src=src, group=ctx.pp_group)
    return out
