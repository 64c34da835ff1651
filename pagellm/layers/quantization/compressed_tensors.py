"""compressed-tensors checkpoints (`quant_method: "compressed-tensors"`, written by llm-compressor).

The config names schemes in `config_groups`, each with `targets` (module class "Linear", or
module names / "re:<regex>"), `weights` {num_bits, type int|float, strategy tensor|channel|group|
block, symmetric, group_size, block_structure} and `input_activations` (null: weight-only;
else {dynamic, strategy token|tensor}); `format` (top level or per group) says how the tensors
are stored, and `ignore` lists modules kept in full precision (e.g. lm_head).

Supported here:
- int-quantized / naive-quantized, 8-bit int: `weight` int8 + `weight_scale` (+ a zero
  `weight_zero_point`) (+ `input_scale` for static activations): W8A8 (dynamic per-token, or
  static per-tensor) with tensor / channel scales, and W8A16 with tensor / channel / group scales.
- float-quantized, 8-bit float: `weight` float8_e4m3fn + `weight_scale` (tensor, channel or
  block): FP8 W8A8 (dynamic or static activations) and FP8 weight-only.
- pack-quantized (4- or 8-bit ints packed into int32 `weight_packed` + `weight_scale` +
  `weight_shape`, optional `weight_zero_point` / `weight_g_idx`): built by
  `compressed_pack.build_pack_quantized`.
Anything else (sparsity, other bit widths, asymmetric int8 activations, ...) is a ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.layers.quantization.base import CheckpointFormat, QuantizedWeight
from pagellm.layers.quantization.fp8 import block_size_from
from pagellm.layers.quantization.w8 import FP8Weight, Int8Weight

FORMATS = ("int-quantized", "naive-quantized", "float-quantized", "pack-quantized")
SUPPORTED = ("int-quantized / naive-quantized: 8-bit int W8A8 (dynamic per-token or static per-tensor "
             "activations) and W8A16; float-quantized: 8-bit float (FP8 e4m3) W8A8 and weight-only; "
             "pack-quantized: 4- or 8-bit int weight-only")
WEIGHT_STRATEGIES = ("tensor", "channel", "group", "block")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"compressed-tensors: {what} is not supported; supported: {SUPPORTED}")


@dataclass(frozen=True)
class Scheme:
    """One config group, validated."""

    targets: tuple[str, ...]
    format: str
    num_bits: int
    type: str  # "int" | "float"
    strategy: str
    symmetric: bool
    group_size: Optional[int]
    block: Optional[tuple[int, int]]
    actorder: Optional[str]
    activation: Optional[str]  # None (weight-only) | "dynamic" | "static"


def _name_matches(pattern: str, prefix: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], prefix) is not None
    return prefix == pattern or prefix.endswith("." + pattern)


def _parse_scheme(name: str, group: dict, default_format: Optional[str]) -> Scheme:
    fmt = group.get("format") or default_format
    if fmt not in FORMATS:
        raise _unsupported(f"format {fmt!r} (config group {name})")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"compressed-tensors: config group {name} has no weights settings")
    bits, wtype = weights.get("num_bits"), weights.get("type", "int")
    strategy = weights.get("strategy", "tensor")
    if strategy not in WEIGHT_STRATEGIES:
        raise _unsupported(f"weights strategy {strategy!r} (config group {name})")
    if fmt == "pack-quantized":
        if wtype != "int" or bits not in (4, 8):
            raise _unsupported(f"pack-quantized {bits}-bit {wtype} weights (config group {name})")
    elif fmt == "float-quantized":
        if wtype != "float" or bits != 8:
            raise _unsupported(f"float-quantized {bits}-bit {wtype} weights (config group {name})")
    elif wtype != "int" or bits != 8:
        raise _unsupported(f"{fmt} {bits}-bit {wtype} weights (config group {name})")
    symmetric = bool(weights.get("symmetric", True))
    if not symmetric and fmt != "pack-quantized":
        raise _unsupported(f"asymmetric {fmt} weights (config group {name})")
    group_size = weights.get("group_size")
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"compressed-tensors: config group {name} has strategy group but group_size {group_size!r}")
    block = block_size_from(weights.get("block_structure"), f"config_groups.{name}.weights.block_structure") \
        if strategy == "block" else None
    if strategy == "block" and (block is None or fmt != "float-quantized"):
        raise _unsupported(f"block strategy with {fmt} (config group {name})")
    activation = _parse_activations(name, group.get("input_activations"), wtype)
    if activation is not None and (fmt == "pack-quantized" or (wtype == "int" and strategy == "group")):
        raise _unsupported(f"{fmt} {strategy} weights with quantized activations (config group {name})")
    targets = group.get("targets") or ["Linear"]
    return Scheme(tuple(targets), fmt, int(bits), wtype, strategy, symmetric,
                  group_size if strategy == "group" else None, block, weights.get("actorder"), activation)


def _parse_activations(name: str, acts, weight_type: str) -> Optional[str]:
    if acts is None:
        return None
    if acts.get("num_bits", 8) != 8 or acts.get("type", "int") != weight_type:
        raise _unsupported(f"{acts.get('num_bits')}-bit {acts.get('type')} activations with {weight_type} "
                           f"weights (config group {name})")
    if not acts.get("symmetric", True):
        raise _unsupported(f"asymmetric activations (config group {name})")
    dynamic, strategy = acts.get("dynamic", False), acts.get("strategy", "tensor")
    if dynamic:
        if strategy not in ("token", "tensor"):
            raise _unsupported(f"dynamic activation strategy {strategy!r} (config group {name})")
        return "dynamic"  # per-tensor dynamic runs per token: finer, never coarser
    if strategy != "tensor":
        raise _unsupported(f"static activation strategy {strategy!r} (config group {name})")
    return "static"


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"

    def __init__(self, schemes: list[Scheme], ignore: tuple[str, ...]) -> None:
        self.schemes, self.ignore = schemes, ignore

    @classmethod
    def from_config(cls, config: dict) -> "CompressedTensorsFormat":
        if config.get("sparsity_config"):
            raise _unsupported(f"sparsity_config {config['sparsity_config'].get('format', '?')!r} (2:4 sparsity)")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors: quantization_config has no config_groups")
        schemes = [_parse_scheme(name, group, config.get("format")) for name, group in groups.items()]
        return cls(schemes, tuple(config.get("ignore") or ()))

    def marker_suffixes(self) -> tuple[str, ...]:
        return ("weight_scale", "weight_packed")

    def part_suffixes(self) -> tuple[str, ...]:
        return ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point",
                "weight_packed", "weight_shape", "weight_g_idx")

    def scheme_for(self, prefix: str) -> Scheme:
        if any(_name_matches(p, prefix) for p in self.ignore):
            raise ValueError("has quantized tensors but is in quantization_config.ignore")
        # Explicit names / regexes win over the "Linear" class target, as in compressed-tensors.
        named = [s for s in self.schemes if any(t != "Linear" and _name_matches(t, prefix) for t in s.targets)]
        found = named or [s for s in self.schemes if "Linear" in s.targets]
        if not found:
            raise ValueError(f"matches no config group's targets ({[s.targets for s in self.schemes]})")
        return found[0]

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        scheme = self.scheme_for(prefix)
        if scheme.format == "pack-quantized":
            return _build_packed(scheme, parts)
        weight, scale = parts.get("weight"), parts.get("weight_scale")
        if weight is None or scale is None:
            raise ValueError(f"{scheme.format} needs weight and weight_scale tensors, got {sorted(parts)}")
        zero = parts.get("weight_zero_point")
        if zero is not None and bool(zero.any()):
            raise _unsupported("a nonzero weight_zero_point (asymmetric weights)")
        input_scale = None
        if scheme.activation == "static":
            if "input_scale" not in parts:
                raise ValueError("static input activations but there is no input_scale tensor")
            if "input_zero_point" in parts and bool(parts["input_zero_point"].any()):
                raise _unsupported("a nonzero input_zero_point (asymmetric activations)")
            input_scale = parts["input_scale"].float().amax()
        if scheme.type == "float":
            if weight.dtype != torch.float8_e4m3fn:
                raise ValueError(f"float-quantized weight is {weight.dtype}, expected float8_e4m3fn")
            if scheme.strategy == "group":
                raise _unsupported("float-quantized group strategy")
            return FP8Weight(weight, scale, scheme.block, scheme.activation, input_scale)
        if weight.dtype != torch.int8:
            raise ValueError(f"{scheme.format} weight is {weight.dtype}, expected int8")
        group = scheme.group_size if scheme.strategy == "group" else None
        return Int8Weight(weight, scale, scheme.activation, input_scale, group)


def _build_packed(scheme: Scheme, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
    try:
        from pagellm.layers.quantization.compressed_pack import build_pack_quantized
    except ImportError as exc:
        raise ValueError(f"compressed-tensors pack-quantized weights need pagellm.layers.quantization."
                         f"compressed_pack, which is not available ({exc})") from exc
    return build_pack_quantized(parts, scheme.num_bits, scheme.group_size, scheme.symmetric, scheme.strategy,
                                scheme.actorder)
