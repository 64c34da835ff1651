"""8-bit linear weights kept quantized: int8 (`Int8Weight`) and FP8 e4m3 (`FP8Weight`).

- int8: (N, K) codes with one float32 scale per output row. Activations: "dynamic" (per-token
  int8, W8A8), "static" (one per-tensor `input_scale`, W8A8) or None (W8A16: weights only).
- FP8: (N, K) float8_e4m3fn codes with a per-tensor, per-channel (N,) or per-block scale
  (`block` = (rows, cols), e.g. (128, 128), scales (ceil(N/128), ceil(K/128))); activations
  "dynamic", "static" (`input_scale`) or None.

Where the arithmetic runs:
- CPU: the C++ kernels of `ops/w8_cpu.py`. int8 W8A8 quantizes the activations in the op and dots
  in int32 up to `W8A8_KERNEL_MAX_ROWS` rows, above that torch._int_mm (oneDNN) is faster (the
  same quantization, then one int32 GEMM); W8A16 and FP8 expand the weight rows to float32 in the
  kernel (FP8 always computes with float activations on the CPU).
- CUDA: FP8 via torch._scaled_mm (per-tensor, or rowwise: per-token x per-channel) with dynamic
  activation scales; int8 via `_cuda_int8_linear` (torch._int_mm plus scaling).
`dequantize()` is the float32 reference every path is tested against.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.quantization.base import QuantizedLinearMethod, QuantizedWeight
from pagellm.ops import w8_cpu

logger = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("dynamic", "static", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Activation rows up to which the int8 C++ kernel is at least as fast as quantize + torch._int_mm
# (oneDNN; scripts/bench_w8.py: 3-4x faster at 1 row, even at 8, slower from 16).
W8A8_KERNEL_MAX_ROWS = 8


def _check_activation(activation: Optional[str], input_scale: Optional[torch.Tensor]) -> None:
    if activation not in ACTIVATION_SCHEMES:
        raise ValueError(f"activation scheme {activation!r} is not one of dynamic, static, None")
    if activation == "static" and input_scale is None:
        raise ValueError("the static activation scheme needs an input_scale")


def _fused_input_scale(parts) -> Optional[torch.Tensor]:
    """Shards of one layer see the same input: their static scales are merged into the largest."""
    scales = [p.input_scale for p in parts if p.input_scale is not None]
    return torch.stack([s.reshape(()) for s in scales]).amax() if scales else None


def quantize_rows_int8(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None):
    """x (M, K) float32 to int8 as the kernels do: per row amax / 127 (1 for a zero row), or the
    static scale with the [-128, 127] clamp; q = round-half-even(x / scale)."""
    if input_scale is None:
        amax = x.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    else:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return torch.round(x / scale).clamp(-128, 127).to(torch.int8), scale


class Int8Weight(QuantizedWeight):
    """int8 codes (N, K) with float32 scales per output row (N,), or, weight-only, per group of
    `group_size` input columns (N, ceil(K / group_size))."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, activation: Optional[str] = None,
                 input_scale: Optional[torch.Tensor] = None, group_size: Optional[int] = None) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"int8 weight codes must be a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        N, K = codes.shape
        scale = scale.float()
        if group_size is not None:
            if activation is not None:
                raise ValueError("int8 weights with group scales are weight-only (W8A16): the int8 activation "
                                 "kernels need one scale per output row")
            if tuple(scale.shape) != (N, math.ceil(K / group_size)):
                raise ValueError(f"int8 weight {tuple(codes.shape)} with group_size {group_size} needs scales of "
                                 f"shape {(N, math.ceil(K / group_size))}, got {tuple(scale.shape)}")
        else:
            scale = scale.reshape(-1)
            if scale.numel() == 1:
                scale = scale.expand(N)
            if scale.numel() != N:
                raise ValueError(f"int8 weight of shape {tuple(codes.shape)} has {scale.numel()} scales; "
                                 f"expected one per output row ({N}) or one per tensor")
        _check_activation(activation, input_scale)
        self.codes, self.scale, self.group_size = codes.contiguous(), scale.contiguous(), group_size
        self.activation = activation
        self.input_scale = None if input_scale is None else input_scale.float().reshape(())
        self.shape = codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel() + (4 if self.input_scale is not None else 0)

    def row_scales(self) -> torch.Tensor:
        """(N, G) float32 scales over groups of `kernel_group_size()` columns (the kernels' layout)."""
        return self.scale if self.group_size is not None else self.scale.reshape(-1, 1)

    def kernel_group_size(self) -> int:
        return self.group_size if self.group_size is not None else self.shape[1]

    def dequantize(self) -> torch.Tensor:
        scales = self.row_scales().repeat_interleave(self.kernel_group_size(), dim=1)[:, :self.shape[1]]
        return self.codes.float() * scales

    def narrow(self, dim: int, start: int, length: int) -> Union["Int8Weight", torch.Tensor]:
        if dim not in (0, 1):
            raise ValueError(f"an int8 weight has 2 dims; cannot narrow dim {dim}")
        codes = self.codes.narrow(dim, start, length).clone()
        if dim == 0:
            scale = self.scale.narrow(0, start, length).clone()
        elif self.group_size is None:
            scale = self.scale
        else:
            gs = self.group_size
            if start % gs or (length % gs and start + length != self.shape[1]):
                logger.warning("int8 weight %s: input columns [%d, %d) do not fall on %d-column groups; "
                               "dequantizing it before the tensor-parallel split", tuple(self.shape), start,
                               start + length, gs)
                return self.dequantize().narrow(1, start, length).clone()
            scale = self.scale.narrow(1, start // gs, math.ceil(length / gs)).clone()
        return Int8Weight(codes, scale, self.activation, self.input_scale, self.group_size)

    def linear_method(self, layer: nn.Module) -> "Int8LinearMethod":
        return Int8LinearMethod()


class FP8Weight(QuantizedWeight):
    """float8_e4m3fn codes (N, K); scale () per tensor, (N,) per channel or (ceil(N/bn), ceil(K/bk))
    per `block` (bn, bk)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, block: Optional[tuple[int, int]] = None,
                 activation: Optional[str] = None, input_scale: Optional[torch.Tensor] = None) -> None:
        if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise ValueError(f"FP8 weight codes must be a 2-D float8_e4m3fn tensor, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        N, K = codes.shape
        scale = scale.float()
        if block is not None:
            bn, bk = block
            want = (math.ceil(N / bn), math.ceil(K / bk))
            if tuple(scale.shape) != want:
                raise ValueError(f"FP8 weight {tuple(codes.shape)} with {bn}x{bk} blocks needs scales of shape "
                                 f"{want}, got {tuple(scale.shape)}")
        elif scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == N:
            scale = scale.reshape(N)
        else:
            raise ValueError(f"FP8 weight of shape {tuple(codes.shape)} has {scale.numel()} scales; expected 1 "
                             f"(per tensor), {N} (per channel) or a block grid with weight_block_size")
        _check_activation(activation, input_scale)
        self.codes, self.scale, self.block = codes.contiguous(), scale.contiguous(), block
        self.activation = activation
        self.input_scale = None if input_scale is None else input_scale.float().reshape(())
        self.shape = codes.shape

    @property
    def scale_kind(self) -> str:
        return "block" if self.block is not None else "tensor" if self.scale.dim() == 0 else "channel"

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel() + (4 if self.input_scale is not None else 0)

    def row_scales(self) -> torch.Tensor:
        """(N, G) float32 scales over groups of `kernel_group_size()` input columns (the kernels' layout)."""
        N, K = self.shape
        if self.block is None:
            return self.scale.reshape(-1, 1).expand(N, 1).contiguous()
        return self.scale.repeat_interleave(self.block[0], dim=0)[:N].contiguous()

    def kernel_group_size(self) -> int:
        return self.block[1] if self.block is not None else self.shape[1]

    def dequantize(self) -> torch.Tensor:
        K = self.shape[1]
        scales = self.row_scales().repeat_interleave(self.kernel_group_size(), dim=1)[:, :K]
        return self.codes.float() * scales

    def narrow(self, dim: int, start: int, length: int) -> Union["FP8Weight", torch.Tensor]:
        if dim not in (0, 1):
            raise ValueError(f"an FP8 weight has 2 dims; cannot narrow dim {dim}")
        codes = self.codes.narrow(dim, start, length).clone()
        if self.block is None:
            scale = self.scale.narrow(0, start, length).clone() if dim == 0 and self.scale.dim() == 1 else self.scale
            return FP8Weight(codes, scale, None, self.activation, self.input_scale)
        step, full = self.block[dim], self.shape[dim]
        if start % step or (length % step and start + length != full):
            logger.warning("FP8 weight %s: the cut [%d, %d) of dim %d is not aligned to its %d-value blocks; "
                           "dequantizing it before the tensor-parallel split", tuple(self.shape), start,
                           start + length, dim, step)
            return self.dequantize().narrow(dim, start, length).clone()
        scale = self.scale.narrow(dim, start // step, math.ceil(length / step)).clone()
        return FP8Weight(codes, scale, self.block, self.activation, self.input_scale)

    def linear_method(self, layer: nn.Module) -> "FP8LinearMethod":
        return FP8LinearMethod()


# ---- CUDA paths (x.is_cuda) ------------------------------------------------------------------

def _cuda_int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, activation: Optional[str],
                      input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x (M, K) times int8 codes (N, K) on CUDA with torch ops; the seam a Triton int8 kernel replaces."""
    if activation is None:  # W8A16: codes to x's dtype, scale the output columns
        return (x @ codes.t().to(x.dtype)) * scale.to(x.dtype)
    q, sx = quantize_rows_int8(x.float(), input_scale if activation == "static" else None)
    M, K = q.shape
    N = codes.shape[0]
    if K % 8 or N % 8:  # outside torch._int_mm's shape rules; float32 sums are exact up to K = 1024
        acc = (q.float() @ codes.t().float())
    else:
        rows = max(32, -(-M // 8) * 8)  # _int_mm needs more than 16 rows, a multiple of 8
        qp = F.pad(q, (0, 0, 0, rows - M)) if rows != M else q
        acc = torch._int_mm(qp, codes.t())[:M].float()
    return (acc * sx * scale).to(x.dtype)


def _quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _cuda_fp8_linear(x: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """x (M, K) times the FP8 weight on CUDA: torch._scaled_mm with per-tensor scales, or rowwise
    (per-token activation x per-channel weight scales); block scales and weight-only checkpoints
    are expanded per call (exact, slow: a blockwise kernel is future work)."""
    N, K = weight.shape
    if weight.block is not None or weight.activation is None or K % 16 or N % 16:
        return F.linear(x, weight.dequantize().to(x.dtype))
    wt = weight.codes.t()  # (K, N) column-major, as _scaled_mm wants its second operand
    M = x.shape[0]
    rows = -(-M // 16) * 16  # the FP8 GEMMs want every dim a multiple of 16; padded rows are zero
    xp = F.pad(x, (0, 0, 0, rows - M)) if rows != M else x
    if weight.scale.dim() == 0:
        if weight.activation == "static":
            sx = weight.input_scale.to(x.device)
        else:
            sx = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        out = torch._scaled_mm(_quantize_fp8(xp, sx), wt, scale_a=sx.reshape(()), scale_b=weight.scale,
                               out_dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype)
        return out[:M].to(x.dtype)
    sx = (xp.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # (rows, 1) per token
    out = torch._scaled_mm(_quantize_fp8(xp, sx), wt, scale_a=sx, scale_b=weight.scale.reshape(1, N),
                           out_dtype=torch.bfloat16)  # rowwise scaling outputs bfloat16
    return out[:M].to(x.dtype)


# ---- linear methods --------------------------------------------------------------------------

def _cpu_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x.reshape(-1, in_features).float().contiguous()


class Int8LinearMethod(QuantizedLinearMethod):
    """Buffers: `qweight` int8 (N, K), `weight_scale` float32 (N,) or (N, G), `input_scale` (static
    only); on the CPU also `weight_row_sums` (int32, for the VNNI dots) and `weight_scale_2d`."""

    def fuse(self, parts: list[QuantizedWeight]) -> Optional[QuantizedWeight]:
        if not all(isinstance(p, Int8Weight) for p in parts) or len({(p.activation, p.group_size) for p in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0]
        return Int8Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          parts[0].activation, _fused_input_scale(parts), parts[0].group_size)

    def install(self, layer: nn.Module, weight: QuantizedWeight) -> None:
        assert isinstance(weight, Int8Weight)
        layer.register_buffer("qweight", weight.codes, persistent=False)
        layer.register_buffer("weight_scale", weight.scale.clone(), persistent=False)
        layer.register_buffer("input_scale", weight.input_scale, persistent=False)
        layer.activation_scheme = weight.activation
        layer.weight_group_size = weight.group_size
        self.prepared = False

    def installed(self, layer: nn.Module) -> Int8Weight:
        return Int8Weight(layer.qweight, layer.weight_scale, layer.activation_scheme, layer.input_scale,
                          layer.weight_group_size)

    def process_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "qweight", None) is None or layer.qweight.is_cuda:
            return
        weight = self.installed(layer)
        layer.register_buffer("weight_row_sums", layer.qweight.sum(1, dtype=torch.int32), persistent=False)
        layer.register_buffer("weight_scale_2d", weight.row_scales().contiguous(), persistent=False)
        self.group_size = weight.kernel_group_size()
        self.has_min_code = bool((layer.qweight == -128).any())
        self.kernels = w8_cpu.load_w8_ops()
        self.prepared = True

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        codes, scale = layer.qweight, layer.weight_scale
        N, K = codes.shape
        scheme = layer.activation_scheme
        static = layer.input_scale if scheme == "static" else None
        if x.is_cuda:
            if layer.weight_group_size is not None:  # group scales: expanded per call (a kernel is future work)
                return F.linear(x, self.installed(layer).dequantize().to(x.dtype))
            return _cuda_int8_linear(x.reshape(-1, K), codes, scale, scheme, static).reshape(*x.shape[:-1], N)
        if not self.prepared:
            self.process_after_loading(layer)
        x2 = _cpu_rows(x, K)
        if scheme is None:
            out = (w8_cpu.w8a16_linear(x2, codes, layer.weight_scale_2d, self.group_size) if self.kernels
                   else F.linear(x2, self.installed(layer).dequantize()))
        elif self.kernels and x2.shape[0] <= W8A8_KERNEL_MAX_ROWS:
            out = w8_cpu.w8a8_linear(x2, codes, scale, layer.weight_row_sums, self.has_min_code,
                                     None if static is None else float(static))
        else:
            q, sx = quantize_rows_int8(x2, static)
            out = torch._int_mm(q, codes.t()).float() * sx * scale
        return out.to(x.dtype).reshape(*x.shape[:-1], N)

    def weight_bytes(self, layer: nn.Module) -> int:
        return layer.qweight.numel() + 4 * layer.weight_scale.numel()


class FP8LinearMethod(QuantizedLinearMethod):
    """Buffers: `qweight` float8_e4m3fn (N, K), `weight_scale` (per tensor / channel / block),
    `input_scale` (static only); on the CPU also `weight_scale_2d` (N, G), the kernel's layout."""

    def fuse(self, parts: list[QuantizedWeight]) -> Optional[QuantizedWeight]:
        if not all(isinstance(p, FP8Weight) for p in parts) or len({p.activation for p in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0]
        codes = torch.cat([p.codes for p in parts])
        first, blocks = parts[0], {p.block for p in parts}
        if first.block is not None:  # stack the block-scale rows: every shard but the last whole blocks
            if len(blocks) != 1 or any(p.shape[0] % first.block[0] for p in parts[:-1]):
                return None
            return FP8Weight(codes, torch.cat([p.scale for p in parts]), first.block, first.activation,
                             _fused_input_scale(parts))
        if blocks != {None}:
            return None
        if all(p.scale.dim() == 0 for p in parts) and all(torch.equal(p.scale, first.scale) for p in parts):
            scale = first.scale  # one per-tensor scale for all
        else:  # per-tensor scales of different shards become per-row scales
            scale = torch.cat([p.scale.reshape(-1).expand(p.shape[0]) for p in parts])
        return FP8Weight(codes, scale, None, first.activation, _fused_input_scale(parts))

    def install(self, layer: nn.Module, weight: QuantizedWeight) -> None:
        assert isinstance(weight, FP8Weight)
        layer.register_buffer("qweight", weight.codes, persistent=False)
        layer.register_buffer("weight_scale", weight.scale.clone(), persistent=False)
        layer.register_buffer("input_scale", weight.input_scale, persistent=False)
        layer.weight_block = weight.block
        layer.activation_scheme = weight.activation
        self.prepared = False

    def installed(self, layer: nn.Module) -> FP8Weight:
        return FP8Weight(layer.qweight, layer.weight_scale, layer.weight_block, layer.activation_scheme,
                         layer.input_scale)

    def process_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "qweight", None) is None or layer.qweight.is_cuda:
            return
        weight = self.installed(layer)
        layer.register_buffer("weight_scale_2d", weight.row_scales(), persistent=False)
        self.group_size = weight.kernel_group_size()
        self.kernels = w8_cpu.load_w8_ops()
        self.prepared = True

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        N, K = layer.qweight.shape
        if x.is_cuda:
            return _cuda_fp8_linear(x.reshape(-1, K), self.installed(layer)).reshape(*x.shape[:-1], N)
        if not self.prepared:
            self.process_after_loading(layer)
        x2 = _cpu_rows(x, K)
        if self.kernels:
            out = w8_cpu.w8a16_linear(x2, layer.qweight, layer.weight_scale_2d, self.group_size)
        else:
            out = F.linear(x2, self.installed(layer).dequantize())
        return out.to(x.dtype).reshape(*x.shape[:-1], N)

    def weight_bytes(self, layer: nn.Module) -> int:
        return layer.qweight.numel() + 4 * layer.weight_scale.numel()
