"""The seams every quantization format plugs into.

- `QuantizedWeight`: what the loader hands a linear layer in place of a dense weight tensor (the
  GGUF blocks of one weight, a GPTQ layer's qweight/qzeros/scales/g_idx, an FP8 weight and its
  scales, ...). It knows its logical (out, in) shape, how to cut a tensor-parallel part of itself
  (`narrow`, aligned to its groups or blocks), how to expand itself (`dequantize`, the reference
  every kernel is tested against) and which `LinearMethod` computes with it.
- `CheckpointFormat`: one `quantization_config["quant_method"]` of a safetensors checkpoint: which
  tensor names belong to a quantized weight and how to build a `QuantizedWeight` from them.
- `OnlineQuantization`: quantizes a full-precision weight at load (`--quantization fp8 | int8`).
- `QuantizedLinearMethod`: the shared shard bookkeeping of a merged layer (q/k/v, gate/up arrive
  one shard at a time); subclasses say how to fuse shards and how to multiply.
"""

from __future__ import annotations

import abc
import logging
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.linear_method import LinearMethod, UnquantizedLinearMethod

logger = logging.getLogger(__name__)


class QuantizedWeight(abc.ABC):
    """A linear weight kept quantized: logically (out_features, in_features)."""

    shape: torch.Size

    def dim(self) -> int:
        return 2

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes of every tensor it holds (codes, scales, zero points, permutations)."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight: the values the kernel multiplies with."""

    @abc.abstractmethod
    def narrow(self, dim: int, start: int, length: int) -> Union["QuantizedWeight", torch.Tensor]:
        """A tensor-parallel part (dim 0: output rows, dim 1: input columns), a copy. Still quantized
        where the cut falls on group/block boundaries; otherwise dequantized, with a warning."""

    @abc.abstractmethod
    def linear_method(self, layer: nn.Module) -> LinearMethod:
        """The method a layer switches to when it is handed this weight."""

    def to_dtype(self, dtype: torch.dtype) -> "QuantizedWeight":
        """The model dtype is for activations; a quantized weight keeps its own (scales included)."""
        return self


class CheckpointFormat(abc.ABC):
    """A safetensors checkpoint's quantization method, parsed from its `quantization_config`."""

    name: ClassVar[str]  # the `quant_method` value, e.g. "gptq"

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict) -> "CheckpointFormat":
        """Validates the `quantization_config` dict; unsupported settings raise ValueError naming them."""

    @abc.abstractmethod
    def marker_suffixes(self) -> tuple[str, ...]:
        """A module `prefix` holds a quantized weight when `prefix.<suffix>` exists for one of these."""

    @abc.abstractmethod
    def part_suffixes(self) -> tuple[str, ...]:
        """Every tensor suffix that belongs to a quantized weight (those present are passed to `build`)."""

    @abc.abstractmethod
    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The quantized weight of module `prefix` from its tensors (keyed by suffix, stored dtypes)."""


class OnlineQuantization(abc.ABC):
    """Quantizes full-precision linear weights once they are loaded."""

    name: ClassVar[str]

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """The (out, in) float weight, quantized."""


SubWeight = Union[QuantizedWeight, torch.Tensor]


class ShardCollector:
    """Collects a linear layer's weight shard by shard: merged layers (q/k/v, gate/up) get theirs one
    at a time. Quantized shards are kept aside (`is_quantized`); a shard stored dense is copied into
    the dense weight the layer was built with. Once the whole weight is in, `complete(layer, parts)`
    gets every shard in row order (quantized, or a dense slice)."""

    def __init__(self) -> None:
        self.shards: dict[Optional[str], object] = {}

    def is_quantized(self, tensor) -> bool:
        raise NotImplementedError

    def complete(self, layer: nn.Module, parts: list) -> None:
        raise NotImplementedError

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        UnquantizedLinearMethod().create_weights(layer, in_features, out_features, bias)

    def load(self, layer: nn.Module, name: str, tensor, shard: Optional[str] = None) -> None:
        if name != "weight":  # biases stay dense
            UnquantizedLinearMethod().load(layer, name, tensor, shard)
            return
        local_out, local_in = layer.weight.shape  # this rank's part (the dense weight lives until complete)
        expected = (layer.shard_offsets[shard][1] if shard is not None else local_out, local_in)
        if tuple(tensor.shape) != expected:
            label = f"shard {shard}.weight" if shard is not None else "weight"
            raise ValueError(f"{label} has shape {tuple(tensor.shape)}, expected {expected}")
        if self.is_quantized(tensor):
            self.shards[shard] = tensor
        else:
            UnquantizedLinearMethod().load(layer, name, tensor, shard)
        if shard is None or set(layer.loaded_shards) >= set(layer.shard_offsets):
            self._finish(layer)

    def _finish(self, layer: nn.Module) -> None:
        whole = None in self.shards or not hasattr(layer, "shard_offsets")  # a fused checkpoint tensor
        order = [None] if whole else list(layer.shard_offsets)
        parts = []
        for shard in order:
            if shard in self.shards:
                parts.append(self.shards[shard])
            else:  # a shard the checkpoint stored dense
                offset, size = layer.shard_offsets[shard]
                parts.append(layer.weight.data.narrow(0, offset, size).clone())
        self.shards = {}
        self.complete(layer, parts)


class QuantizedLinearMethod(ShardCollector, LinearMethod, abc.ABC):
    """A linear layer whose weight is a `QuantizedWeight`, collected shard by shard.

    Created by the layer when the first quantized tensor arrives (the dense weight it was built
    with is never written, so it costs no resident memory, and is dropped once complete). When
    every shard has arrived they are fused into one weight (`fuse`), so the layer is one kernel
    call; shards that cannot be fused (different formats, or a dense shard among quantized ones)
    are dequantized into a dense weight, with a warning.
    Subclasses implement `fuse`, `install` (register the weight's tensors as the layer's buffers,
    so `.to(device)` moves them and weight accounting sees them) and `apply_quantized`.
    """

    prepackable = False  # oneDNN packs dense float weights only

    def __init__(self) -> None:
        super().__init__()
        self.dense = False  # fell back to a dense weight

    def is_quantized(self, tensor) -> bool:
        return isinstance(tensor, QuantizedWeight)

    def complete(self, layer: nn.Module, parts: list[SubWeight]) -> None:
        fused = self.fuse(parts) if all(isinstance(p, QuantizedWeight) for p in parts) else None
        if fused is None:
            logger.warning("%s: shards of mixed formats cannot be fused; using a dense weight", type(layer).__name__)
            layer.weight = nn.Parameter(torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p.float()
                                                   for p in parts]).to(layer.weight.dtype), requires_grad=False)
            self.dense = True
            return
        layer.weight = None
        self.install(layer, fused)

    def fuse(self, parts: list[QuantizedWeight]) -> Optional[QuantizedWeight]:
        """One weight with the parts' rows stacked in order, or None when they cannot be stacked."""
        return parts[0] if len(parts) == 1 else None

    @abc.abstractmethod
    def install(self, layer: nn.Module, weight: QuantizedWeight) -> None:
        """Registers the weight's tensors on the layer (buffers) for `apply_quantized`."""

    @abc.abstractmethod
    def apply_quantized(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) times the installed weight, in x's dtype, without bias."""

    def apply(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        bias = None if skip_bias else getattr(layer, "bias", None)
        if self.dense:
            return F.linear(x, layer.weight, bias)
        out = self.apply_quantized(layer, x)
        return out if bias is None else out + bias
