"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout), converted at load into the fixed
`GroupQuantizedWeight` layout.

Per linear layer `<prefix>`, for K inputs, N outputs, G = group_size (K when -1):
- `qweight` int32 (K*bits/32, N): along K, low bits first (word i of column n holds inputs
  i*32/bits ...).
- `qzeros` int32 (ceil(K/G), N*bits/32): along N, low bits first. checkpoint_format "gptq" (v1,
  the default) stores zero - 1 (AutoGPTQ's convention; a stored all-ones field is a zero point of 0
  that wrapped); "gptq_v2" stores the zero point itself.
- `scales` float16 (ceil(K/G), N).
- `g_idx` int32 (K,), optional: the group of input k (act order, desc_act: not k // G); the
  stored columns are then sorted by group, and x is permuted to match at run time.
value = (code - zero) * scale.
"""

from __future__ import annotations

import logging

import torch

from pagellm.layers.quantization.base import CheckpointFormat
from pagellm.layers.quantization.int_group import (GroupQuantizedWeight, group_count, midpoint, pack_codes,
                                                   perm_from_g_idx, unpack_int32)

logger = logging.getLogger(__name__)

GPTQ_BITS = (4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def checked_scales(scales: torch.Tensor, n: int, k: int, group_size: int) -> tuple[int, int, torch.Tensor]:
    """(group size, groups per row, float16 scales) of a GPTQ/AWQ layer's (groups, N) `scales`; group_size -1
    is one group per row. A wrong shape is a ValueError naming the expected one."""
    size = k if group_size == -1 else group_size
    groups = group_count(k, size)
    scales = float16_scales(scales, "scales")
    if tuple(scales.shape) != (groups, n):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected ({groups}, {n}) for a ({k}, {n}) "
                         f"qweight with group_size {group_size}")
    return size, groups, scales


def float16_scales(scales: torch.Tensor, what: str) -> torch.Tensor:
    """The fixed layout keeps float16 scales; other float dtypes are converted (with a warning if that rounds)."""
    if scales.dtype == torch.float16:
        return scales
    if not scales.dtype.is_floating_point:
        raise ValueError(f"{what} must be a float tensor, got {scales.dtype}")
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        logger.warning("%s are %s; rounding them to float16 changes some", what, scales.dtype)
    return half


def symmetric_or(zeros: torch.Tensor, bits: int):
    """None when every zero point is the symmetric midpoint (the kernels then skip the correction)."""
    return None if bool((zeros == midpoint(bits)).all()) else zeros.contiguous()


class GPTQFormat(CheckpointFormat):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, v1_zeros: bool) -> None:
        self.bits, self.group_size, self.v1_zeros = bits, group_size, v1_zeros

    @classmethod
    def from_config(cls, config: dict) -> "GPTQFormat":
        bits = config.get("bits")
        if bits not in GPTQ_BITS:
            raise ValueError(f"quantization_config.bits={bits!r} is not supported for gptq; supported: "
                             f"{', '.join(map(str, GPTQ_BITS))}")
        group_size = config.get("group_size", -1)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"quantization_config.group_size={group_size!r}: must be a positive integer or -1")
        fmt = config.get("checkpoint_format", "gptq") or "gptq"
        if fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported; supported: "
                             f"{', '.join(GPTQ_CHECKPOINT_FORMATS)}")
        return cls(bits, group_size, v1_zeros=fmt == "gptq")

    def marker_suffixes(self) -> tuple[str, ...]:
        return ("qweight",)

    def part_suffixes(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales", "g_idx")

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> GroupQuantizedWeight:
        missing = [s for s in ("qweight", "qzeros", "scales") if s not in parts]
        if missing:
            raise ValueError(f"missing tensors {', '.join(prefix + '.' + s for s in missing)}")
        bits = self.bits
        qweight, qzeros = parts["qweight"], parts["qzeros"]
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise ValueError(f"qweight and qzeros must be int32, got {qweight.dtype} and {qzeros.dtype}")
        codes = unpack_int32(qweight, bits, dim=0).T  # (N, K)
        n, k = codes.shape
        group_size, groups, scales = checked_scales(parts["scales"], n, k, self.group_size)
        if tuple(qzeros.shape) != (groups, n * bits // 32):
            raise ValueError(f"qzeros has shape {tuple(qzeros.shape)}, expected ({groups}, {n * bits // 32})")
        zeros = unpack_int32(qzeros, bits, dim=1)
        if self.v1_zeros:  # stored zero - 1; all ones is a zero of 0 that wrapped
            zeros = ((zeros.to(torch.int16) + 1) & ((1 << bits) - 1)).to(torch.uint8)
        perm = None
        if "g_idx" in parts:
            if parts["g_idx"].numel() != k:
                raise ValueError(f"g_idx has {parts['g_idx'].numel()} entries, expected {k}")
            perm = perm_from_g_idx(parts["g_idx"], group_size)
        if perm is not None:
            codes = codes[:, perm]
        return GroupQuantizedWeight(bits, pack_codes(codes, bits), scales.T.contiguous(),
                                    symmetric_or(zeros.T, bits), group_size, k, perm)
