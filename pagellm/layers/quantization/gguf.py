"""GGUF block-quantized linear weights, kept as their on-disk bytes and multiplied by a C++ kernel.

The loader yields a `GGUFQuantizedTensor` (the raw blocks of a weight, its ggml type and logical
shape) instead of a dequantized tensor; a `Linear` that is handed one switches itself to
`GGUFLinearMethod`. The matmul (`pagellm/ops/gguf_cpu.py`) expands each 32-value block (256 for
the K-quants) to float32
in registers where it is used: activations and accumulation stay float32, only the weight bytes
read per step shrink (Q4_1: 0.625 bytes per weight instead of 4).

A merged layer (q/k/v, gate/up) fills shard by shard. When every shard is quantized with one
type, their rows are concatenated into one weight (ggml rows are independent), so the layer is a
single kernel call as before; shards of different types, or a mix with dense (dequantized)
shards, stay separate sub-weights whose outputs are concatenated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from pagellm.layers.linear_method import LinearMethod
from pagellm.layers.quantization.base import ShardCollector
from pagellm.ops.gguf_cpu import TILED_TYPES, gguf_dequantize, gguf_linear, gguf_tiled_linear, gguf_tiled_repack

logger = logging.getLogger(__name__)

# The ggml types the C++ kernel computes on; any other type is dequantized at load.
GGUF_KERNEL_TYPES = frozenset({
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,  # 256-value super-blocks
})
# On a GPU: the types `ops/gguf_repack.py` turns into the Triton group GEMM's layout (32-value groups).
GGUF_GPU_KERNEL_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0})
GGUF_GROUP = 32


@dataclass(frozen=True)
class GGUFQuantizedTensor:
    """A weight as GGUF blocks: `data` is (rows, row_bytes) uint8, `shape` the logical (rows, cols)."""

    data: torch.Tensor
    ggml_type: GGMLQuantizationType
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (the same values the kernel multiplies with)."""
        return gguf_dequantize(self.data, int(self.ggml_type), self.shape[0], self.shape[1])

    def linear_method(self, layer: nn.Module) -> "GGUFLinearMethod":
        return GGUFLinearMethod()

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> Union["GGUFQuantizedTensor", torch.Tensor]:
        """A tensor-parallel rank's part, still quantized where the cut falls on block boundaries.

        ggml rows are independent, so output rows (dim 0, column-parallel) always cut cleanly. Input
        columns (dim 1, row-parallel) cut cleanly when start and length are whole blocks (32 values
        for the 32-value types, 256 for the K-quants); otherwise the weight is dequantized first, with a warning. The part
        is a copy, so the full tensor can be freed once every layer has taken its part."""
        if dim == 0:
            return GGUFQuantizedTensor(self.data[start:start + length].clone(), self.ggml_type,
                                       torch.Size((length, self.shape[1])))
        if dim != 1:
            raise ValueError(f"a GGUF weight has 2 dims; cannot narrow dim {dim}")
        block, block_bytes = GGML_QUANT_SIZES[self.ggml_type]
        if start % block or length % block:
            logger.warning("GGUF %s weight %s: input columns [%d, %d) do not fall on %d-value block boundaries; "
                           "dequantizing it before the tensor-parallel split", self.ggml_type.name,
                           tuple(self.shape), start, start + length, block)
            return self.dequantize().narrow(1, start, length).clone()
        cols = slice(start // block * block_bytes, (start + length) // block * block_bytes)
        return GGUFQuantizedTensor(self.data[:, cols].contiguous(), self.ggml_type,
                                   torch.Size((self.shape[0], length)))


# One piece of a layer's output rows: quantized blocks, or a dense float weight.
SubWeight = Union[GGUFQuantizedTensor, torch.Tensor]


class GGUFLinearMethod(ShardCollector, LinearMethod):
    """Weights as GGUF blocks (`layer.qweight`, `layer.ggml_type`), applied by the C++ kernel.

    Created by the layer when the first quantized tensor arrives: the dense weight the layer was
    built with stays allocated only until every shard has arrived, then it is dropped.
    """

    prepackable = False  # oneDNN packs dense weights only

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[SubWeight] = []  # set once complete, when shards cannot be fused
        self.group_bits = 0  # on a GPU: the weight repacked for the Triton group GEMM (4 or 8 bits)
        self.parts_placed: Optional[tuple] = None  # (device, dtype) the parts were last moved to
        self.tiled = False  # on the CPU: `qweight` rearranged into 16-row tiles (`use_tiles`)

    def is_quantized(self, tensor) -> bool:
        return isinstance(tensor, GGUFQuantizedTensor)

    def complete(self, layer: nn.Module, parts: list[SubWeight]) -> None:
        """Fuses shards of one type into one weight (ggml rows are independent), else keeps the parts;
        drops the dense copy."""
        types = {p.ggml_type for p in parts if isinstance(p, GGUFQuantizedTensor)}
        if len(types) == 1 and all(isinstance(p, GGUFQuantizedTensor) for p in parts):
            data = parts[0].data if len(parts) == 1 else torch.cat([p.data for p in parts])
            layer.register_buffer("qweight", data, persistent=False)
            layer.ggml_type = int(parts[0].ggml_type)
            self.parts = []
        else:
            self.parts = parts
            layer.qweight = None
        layer.weight = None

    def process_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "qweight", None) is not None and layer.qweight.is_cuda:
            self.use_group_kernel(layer)

    def use_group_kernel(self, layer: nn.Module) -> None:
        """Repacks the fused blocks into the Triton group GEMM's layout (the GPU path; the loader keeps
        only `GGUF_GPU_KERNEL_TYPES` there); another type is dequantized to a dense weight."""
        from pagellm.ops.gguf_repack import repack_gguf, repackable_gguf_types

        if self.group_bits:
            return
        qweight, ggml_type = layer.qweight, layer.ggml_type
        if ggml_type not in repackable_gguf_types():
            logger.warning("GGUF %s weight: no GPU kernel; dequantized", GGMLQuantizationType(ggml_type).name)
            dense = gguf_dequantize(qweight.cpu(), ggml_type, qweight.shape[0], self._in_features(layer))
            layer.weight = nn.Parameter(dense.to(qweight.device), requires_grad=False)
            self.parts, layer.qweight = [layer.weight], None
            return
        codes, scales, zeros, self.group_bits = repack_gguf(qweight, ggml_type)
        layer.register_buffer("group_qweight", codes, persistent=False)
        layer.register_buffer("group_scales", scales, persistent=False)
        layer.register_buffer("group_zeros", zeros, persistent=False)
        layer.qweight = None

    def use_tiles(self, layer: nn.Module) -> bool:
        """CPU: rearranges a fused Q4_0/Q4_1/Q8_0 weight into the tiled kernels' 16-row tiles (the same
        bytes; `csrc/gguf_tiled_ops.cpp`). True when the layer now runs on tiles."""
        qweight = getattr(layer, "qweight", None)
        if self.tiled or self.group_bits or qweight is None or qweight.is_cuda or layer.ggml_type not in TILED_TYPES:
            return self.tiled
        rows = qweight.shape[0]
        tiled = gguf_tiled_repack(qweight, layer.ggml_type, rows, self._in_features(layer))
        layer.register_buffer("qweight", tiled, persistent=False)
        layer.tiled_rows = rows
        self.tiled = True
        return True

    @staticmethod
    def _in_features(layer: nn.Module) -> int:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(layer.ggml_type)]
        return layer.qweight.shape[1] // block_bytes * block

    def _parts_to(self, device: torch.device, dtype: torch.dtype) -> None:
        """GPU: the unfusable parts (kept in a list, which `.to()` does not move) as dense weights there."""
        self.parts = [(p.dequantize() if isinstance(p, GGUFQuantizedTensor) else p).to(device, dtype)
                      for p in self.parts]
        self.parts_placed = (device, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        int8 = getattr(layer, "int8_activations", False)  # EngineConfig.cpu_int8_activations
        if x.is_cuda:
            return self._apply_gpu(layer, x, skip_bias)
        if self.parts:
            out = torch.cat([self._apply_part(p, x, int8) for p in self.parts], dim=-1)
        else:
            if self.tiled:
                out = gguf_tiled_linear(x, layer.qweight, layer.ggml_type, layer.tiled_rows, int8)
            else:
                out = gguf_linear(x, layer.qweight, layer.ggml_type, layer.qweight.shape[0], int8)
            if out.dtype != x.dtype:  # the kernels write float32; a no-op .to() still costs a dispatch
                out = out.to(x.dtype)
        bias = None if skip_bias else getattr(layer, "bias", None)
        return out if bias is None else out + bias

    def _apply_gpu(self, layer: nn.Module, x: torch.Tensor, skip_bias: bool) -> torch.Tensor:
        bias = None if skip_bias else getattr(layer, "bias", None)
        if self.parts:
            if self.parts_placed != (x.device, x.dtype):
                self._parts_to(x.device, x.dtype)
            out = torch.cat([F.linear(x, p) for p in self.parts], dim=-1)
        else:
            from pagellm.ops.triton_quant_matmul import group_matmul

            self.use_group_kernel(layer)  # once; normally done after loading
            out = group_matmul(x, layer.group_qweight, layer.group_scales, layer.group_zeros, GGUF_GROUP,
                               self.group_bits)
        return out if bias is None else out + bias

    @staticmethod
    def _apply_part(part: SubWeight, x: torch.Tensor, int8_activations: bool) -> torch.Tensor:
        if isinstance(part, GGUFQuantizedTensor):
            return gguf_linear(x, part.data, int(part.ggml_type), part.shape[0], int8_activations).to(x.dtype)
        return F.linear(x, part)

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes the layer's weight occupies (quantized blocks, plus any dense parts)."""
        if self.group_bits:
            return sum(t.numel() * t.element_size() for t in (layer.group_qweight, layer.group_scales, layer.group_zeros)
                       if t is not None)
        if not self.parts:
            return layer.qweight.numel()  # tiles: the same bytes, rows padded to a multiple of 16
        return sum(p.nbytes if isinstance(p, GGUFQuantizedTensor) else p.numel() * p.element_size()
                   for p in self.parts)


def tile_gguf_weights(model: nn.Module) -> list[bool]:
    """`use_tiles` on every layer whose weight method has it (GGUF blocks, and group-quantized weights
    repacked into them); a tied LM head shares the embedding's row-layout blocks and is left alone.
    One bool per such layer: whether it now runs on tiles."""
    return [m.method.use_tiles(m) for m in model.modules()
            if callable(getattr(getattr(m, "method", None), "use_tiles", None)) and not getattr(m, "tied", False)]
