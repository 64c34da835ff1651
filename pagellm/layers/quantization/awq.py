"""AWQ checkpoints (AutoAWQ's GEMM layout), converted at load into the fixed `GroupQuantizedWeight`.

Per linear layer `<prefix>`, for K inputs, N outputs, G = group size:
- `qweight` int32 (K, N/8): 8 output columns per word, in AWQ's interleaved order: the nibble at
  bits 4i holds column 8c + AWQ_ORDER[i] of word c.
- `qzeros` int32 (ceil(K/G), N/8): the zero points, same order (no offset, unlike GPTQ v1).
- `scales` float16 (ceil(K/G), N).
value = (code - zero) * scale. Only the GEMM layout is read ("gemv" packs along K in another order).
"""

from __future__ import annotations

import torch

from pagellm.layers.quantization.base import CheckpointFormat
from pagellm.layers.quantization.gptq import checked_scales, symmetric_or
from pagellm.layers.quantization.int_group import GroupQuantizedWeight, pack_codes, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_UNDO_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in nibble AWQ_UNDO_ORDER[j]
AWQ_VERSIONS = ("gemm",)
AWQ_BITS = (4,)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 in AWQ's order -> (R, C) uint8 codes in column order."""
    nibbles = unpack_int32(packed, 4, dim=1)  # column 8c + i is nibble i of word c
    rows, cols = nibbles.shape
    return nibbles.view(rows, cols // 8, 8)[..., list(AWQ_UNDO_ORDER)].reshape(rows, cols)


class AWQFormat(CheckpointFormat):
    name = "awq"

    def __init__(self, group_size: int, zero_point: bool) -> None:
        self.group_size, self.zero_point = group_size, zero_point

    @classmethod
    def from_config(cls, config: dict) -> "AWQFormat":
        version = str(config.get("version", "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise ValueError(f"quantization_config.version={config.get('version')!r} is not supported for awq; "
                             f"supported: {', '.join(AWQ_VERSIONS)}")
        bits = config.get("bits", config.get("w_bit"))
        if bits not in AWQ_BITS:
            raise ValueError(f"quantization_config.bits={bits!r} is not supported for awq; supported: 4")
        group_size = config.get("group_size", config.get("q_group_size", 128))
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"quantization_config.group_size={group_size!r}: must be a positive integer or -1")
        return cls(group_size, bool(config.get("zero_point", True)))

    def marker_suffixes(self) -> tuple[str, ...]:
        return ("qweight",)

    def part_suffixes(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def build(self, prefix: str, parts: dict[str, torch.Tensor]) -> GroupQuantizedWeight:
        needed = ("qweight", "qzeros", "scales") if self.zero_point else ("qweight", "scales")
        missing = [s for s in needed if s not in parts]
        if missing:
            raise ValueError(f"missing tensors {', '.join(prefix + '.' + s for s in missing)}")
        codes = unpack_awq(parts["qweight"]).T.contiguous()  # (N, K)
        n, k = codes.shape
        group_size, groups, scales = checked_scales(parts["scales"], n, k, self.group_size)
        zeros = None
        if "qzeros" in parts:
            if tuple(parts["qzeros"].shape) != (groups, n // 8):
                raise ValueError(f"qzeros has shape {tuple(parts['qzeros'].shape)}, expected ({groups}, {n // 8})")
            zeros = symmetric_or(unpack_awq(parts["qzeros"]).T, 4)
        return GroupQuantizedWeight(4, pack_codes(codes, 4), scales.T.contiguous(), zeros, group_size, k)
