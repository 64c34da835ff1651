"""Linear layers that know how to load their weights, including merged projections.

Merging q/k/v (and gate/up) into one matrix turns three matmuls into one; the loader
fills each shard from the checkpoint's separate tensors.

What the weight is and how the matmul runs is the layer's `LinearMethod` (see `linear_method.py`):
plain `F.linear` by default, oneDNN-prepacked on the CPU after `prepack_for_cpu()`. How the layer
is split across tensor-parallel ranks is its `ParallelStyle`, read with the rank and size from the
parallel context when the layer is built: a COLUMN layer holds a slice of the output features, a
ROW layer a slice of the input features and sums its partial outputs over the ranks. Each rank
creates only its part and `checkpoint_shard` cuts that part out of every checkpoint tensor.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
from torch import nn

from pagellm.distributed.communication import tensor_parallel_all_reduce
from pagellm.distributed.layout import ShardRange, shard_range
from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context
from pagellm.layers.linear_method import (  # noqa: F401  (re-exported: callers import them from here)
    CpuPackedLinearMethod,
    LinearMethod,
    UnquantizedLinearMethod,
    cpu_prepack_available,
    pack_weight_for_cpu,
    packed_linear,
)
from pagellm.layers.utils import call_on_layers, materialize


class ParallelStyle(enum.Enum):
    """How a layer's weight is split across tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds the whole weight
    COLUMN = "column"  # output features split across ranks
    ROW = "row"  # input features split across ranks (outputs summed)


class Linear(nn.Module):
    """`in_features` / `out_features` are the full (checkpoint) sizes; the weight holds this rank's part."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel_style: ParallelStyle = ParallelStyle.REPLICATED,
                 method: Optional[LinearMethod] = None, parallel: Optional[ParallelContext] = None,
                 local_out_features: Optional[int] = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.parallel_style = parallel_style
        self.parallel = parallel if parallel is not None else get_parallel_context()
        tp_rank, tp_size = self.parallel.tp_rank, self.parallel.tp_size
        local_in, local_out = in_features, out_features
        # The slice of the weight's sharded dim this rank holds (None: the whole weight).
        self.tp_range: Optional[ShardRange] = None
        if local_out_features is not None:  # a merged layer splits each of its projections itself
            local_out = local_out_features
        elif tp_size > 1 and parallel_style is ParallelStyle.COLUMN:
            self.tp_range = shard_range(out_features, tp_rank, tp_size, what="output features")
            local_out = self.tp_range.size
        elif tp_size > 1 and parallel_style is ParallelStyle.ROW:
            self.tp_range = shard_range(in_features, tp_rank, tp_size, what="input features")
            local_in = self.tp_range.size
        self.method = method if method is not None else UnquantizedLinearMethod()
        self.method.create_weights(self, local_in, local_out, bias)
        self.packed: Optional[torch.Tensor] = None  # the oneDNN weight once prepacked (CPU)

    @property
    def reduces_output(self) -> bool:
        return self.parallel_style is ParallelStyle.ROW and self.parallel.tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduces_output:
            return self.method.apply(self, x)
        # The bias is added once, after the partial outputs are summed.
        out = tensor_parallel_all_reduce(self.method.apply(self, x, skip_bias=True), self.parallel)
        bias = getattr(self, "bias", None)
        return out if bias is None else out + bias

    def checkpoint_shard(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (the whole tensor when not split): a COLUMN layer
        narrows the output dim (weight rows, bias), a ROW layer the weight's input dim (its bias is whole)."""
        if self.tp_range is None:
            return tensor
        if self.parallel_style is ParallelStyle.ROW:
            return tensor if name == "bias" else _narrow(tensor, 1, self.tp_range, name, self.in_features)
        return _narrow(tensor, 0, self.tp_range, name, self.out_features)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        tensor = self._method_for(materialize(self.checkpoint_shard(name, tensor)))
        self.method.load(self, name, tensor)

    def _method_for(self, tensor):
        """A quantized tensor (e.g. GGUF blocks, already cut to this rank's part, which stays
        quantized where the cut is block-aligned) brings its own weight method."""
        make = getattr(tensor, "linear_method", None)
        if make is None:
            return tensor
        if type(self.method) is UnquantizedLinearMethod:
            self.method = make(self)
        return tensor

    def process_after_loading(self) -> None:
        """The method's post-load step (none for plain weights)."""
        self.method.process_after_loading(self)

    def enable_int8_activations(self) -> None:
        """Lets a quantized method that can (GGUF blocks) quantize decode activations to int8."""
        self.int8_activations = True

    def quantize_online(self, online) -> bool:
        """Quantizes the loaded dense weight with `online` (an `OnlineQuantization`); False when the
        weight is already quantized. The quantized weight brings its method, as a checkpoint's does."""
        if type(self.method) is not UnquantizedLinearMethod:
            return False
        weight = online.quantize(self.weight.data)
        self.method = weight.linear_method(self)
        self.method.install(self, weight)
        self.weight = None
        return True

    def prepack_for_cpu(self) -> None:
        """Switches to the oneDNN-packed method: packs the loaded weight and drops the plain copy.
        Quantized weights keep their own method."""
        if not self.method.prepackable:
            return
        self.method = CpuPackedLinearMethod()
        self.method.process_after_loading(self)


def _narrow(tensor: torch.Tensor, dim: int, part: ShardRange, name: str, full: int) -> torch.Tensor:
    if tensor.dim() <= dim or tensor.shape[dim] != full:
        raise ValueError(f"checkpoint {name} has shape {tuple(tensor.shape)}; expected {full} along dim {dim} "
                         "before the tensor-parallel split")
    return tensor.narrow(dim, part.start, part.size)


class MergedLinear(Linear):
    """Several output projections stacked along the output dim, e.g. [q | k | v].

    Column-parallel, each projection is split on its own, so a rank holds [q_r | k_r | v_r];
    `shard_replicas[name]` ranks share one part of that projection (KV heads replicated when
    there are fewer of them than ranks). `shard_offsets` are this rank's offsets and sizes.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False,
                 parallel_style: ParallelStyle = ParallelStyle.REPLICATED,
                 method: Optional[LinearMethod] = None, parallel: Optional[ParallelContext] = None,
                 shard_replicas: Optional[dict[str, int]] = None) -> None:
        if parallel_style is ParallelStyle.ROW:
            raise ValueError("a merged linear layer stacks outputs; it can be REPLICATED or COLUMN, not ROW")
        ctx = parallel if parallel is not None else get_parallel_context()
        split = parallel_style is ParallelStyle.COLUMN and ctx.tp_size > 1
        replicas = shard_replicas or {}
        # Per projection: (its full size, this rank's part of it).
        parts: dict[str, tuple[int, ShardRange]] = {
            name: (size, shard_range(size, ctx.tp_rank, ctx.tp_size, replicas.get(name, 1), what=f"shard {name}")
                   if split else ShardRange(0, size))
            for name, size in shard_sizes.items()}
        super().__init__(in_features, sum(shard_sizes.values()), bias, parallel_style, method, ctx,
                         local_out_features=sum(part.size for _, part in parts.values()))
        self.shard_parts = parts
        self.split_shards = split
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, (_, part) in self.shard_parts.items():
            self.shard_offsets[shard] = (offset, part.size)
            offset += part.size
        self.split_sizes = [size for _, size in self.shard_offsets.values()]
        self.loaded_shards: set[str] = set()  # weight shards filled so far (a quantized method fuses them)

    def checkpoint_shard(self, name: str, tensor: torch.Tensor, shard: Optional[str] = None) -> torch.Tensor:
        """This rank's part of one projection's tensor, or of a fused checkpoint tensor (shard None:
        Phi-3 stores qkv_proj whole), cut projection by projection."""
        if not self.split_shards:
            return tensor
        if shard is not None:
            full, part = self.shard_parts[shard]
            return _narrow(tensor, 0, part, f"{shard}.{name}", full)
        fulls = [full for full, _ in self.shard_parts.values()]
        if hasattr(tensor, "dequantize"):  # a fused quantized tensor: cut its dequantized rows
            tensor = tensor.dequantize()
        tensor = materialize(tensor)
        if tensor.shape[0] != sum(fulls):
            raise ValueError(f"checkpoint {name} has {tensor.shape[0]} rows, expected {sum(fulls)} ({fulls})")
        pieces = tensor.split(fulls, dim=0)
        return torch.cat([p.narrow(0, part.start, part.size) for p, (_, part) in zip(pieces, self.shard_parts.values())])

    def load_shard(self, shard: str, name: str, tensor: torch.Tensor) -> None:
        tensor = self._method_for(materialize(self.checkpoint_shard(name, tensor, shard)))
        if name == "weight":
            self.loaded_shards.add(shard)
        self.method.load(self, name, tensor, shard)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # split_with_sizes directly: Tensor.split's Python wrapper cost half of the call (~2 us).
        return out.split_with_sizes(self.split_sizes, dim=-1)


def quantize_linear_layers(model: nn.Module, online) -> int:
    """Quantizes every dense linear layer's weight with `online` (the LM head and embeddings stay
    as they are, as in vLLM); returns how many were quantized."""
    return sum(layer.quantize_online(online) for layer in model.modules() if isinstance(layer, Linear))


def prepack_cpu_weights(model: nn.Module) -> int:
    """Prepacks every layer of `model` that supports it; returns how many were packed."""
    return call_on_layers(model, "prepack_for_cpu")
