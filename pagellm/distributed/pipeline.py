"""Pipeline stages: which decoder layers a stage owns, and the placeholder for what it does not.

The layers are split contiguously and as evenly as possible (vLLM's rule): every stage gets
`num_layers // pp` layers, and the remainder goes one each to the stages just before the last,
because the last stage also runs the final norm, the LM head and sampling. The first stage
owns the embedding, the last the final norm and the LM head. A model keeps one entry per
layer index (the others are `MissingLayer`s), so checkpoint names keep their indices and a
stage's weight loader can skip tensors that belong to another stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context


def stage_layer_counts(num_layers: int, pp_size: int) -> list[int]:
    """Layers per stage, first stage first; a ValueError naming the numbers when a stage would get none."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) is more than the model's num_hidden_layers "
                         f"({num_layers}); every stage needs at least one decoder layer")
    counts = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        counts[-2 - i] += 1  # the remainder is < pp_size, so this stays in range
    return counts


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers stage `pp_rank` owns."""
    counts = stage_layer_counts(num_layers, pp_size)
    start = sum(counts[:pp_rank])
    return start, start + counts[pp_rank]


@dataclass(frozen=True)
class Stage:
    """What one rank's part of a model holds."""

    start: int  # first decoder layer (inclusive)
    end: int  # last decoder layer (exclusive)
    is_first: bool  # owns the embedding
    is_last: bool  # owns the final norm and the LM head

    def owns(self, layer_idx: int) -> bool:
        return self.start <= layer_idx < self.end


def model_stage(num_layers: int, ctx: Optional[ParallelContext] = None) -> Stage:
    """This rank's stage of a `num_layers`-layer model (the whole model without pipeline parallelism)."""
    ctx = ctx if ctx is not None else get_parallel_context()
    start, end = stage_layer_range(num_layers, ctx.pp_rank, ctx.pp_size)
    return Stage(start, end, ctx.is_first_stage, ctx.is_last_stage)


class MissingLayer(nn.Module):
    """Stands where another stage's module would be: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on another pipeline stage")


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes ("model.layers.3.") of the modules another stage holds; their tensors are skipped."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, MissingLayer))
