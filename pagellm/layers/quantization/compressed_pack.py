"""compressed-tensors' "pack-quantized" weights (llm-compressor W4A16 / W8A16), converted into the
fixed `GroupQuantizedWeight` layout. The format object (which config group a layer belongs to)
lives in compressed_tensors.py; this builds one layer from its tensors.

Per linear layer, for K inputs, N outputs, G = group size (K for the channel strategy):
- `weight_packed` int32 (N, ceil(K*bits/32)): along K, low bits first. The codes are signed
  (-2^(bits-1) .. 2^(bits-1) - 1) stored with an offset of 2^(bits-1), i.e. unsigned, exactly the
  fixed layout's codes.
- `weight_scale` (N, ceil(K/G)) for strategy "group", (N, 1) for "channel", in the model dtype.
- `weight_zero_point`, asymmetric only: signed zero points, either packed like the weight but
  along N (int32 (ceil(N*bits/32), groups), stored with the same offset) or plain (N, groups).
- `weight_shape` (2,): (N, K). `weight_g_idx` (K,), actorder "group": the group of input k.
value = (signed code - signed zero) * scale = (unsigned code - (zero + 2^(bits-1))) * scale.
"""

from __future__ import annotations

from typing import Optional

import torch

from pagellm.layers.quantization.gptq import float16_scales, symmetric_or
from pagellm.layers.quantization.int_group import (GroupQuantizedWeight, group_count, midpoint, pack_codes,
                                                   perm_from_g_idx, unpack_int32)

PACK_BITS = (4, 8)
PACK_STRATEGIES = ("group", "channel")
PACK_ACTORDERS = (None, "group", "weight", "static", "dynamic")


def _zero_points(zero_point: torch.Tensor, bits: int, n: int, groups: int) -> torch.Tensor:
    """Unsigned (N, groups) zero points from either stored form."""
    if zero_point.dtype == torch.int32 and tuple(zero_point.shape) == (-(-n * bits // 32), groups):
        return unpack_int32(zero_point, bits, dim=0)[:n]  # packed along N, offset already added
    if tuple(zero_point.shape) != (n, groups) or zero_point.dtype.is_floating_point:
        raise ValueError(f"weight_zero_point has shape {tuple(zero_point.shape)} ({zero_point.dtype}), expected "
                         f"({n}, {groups}) signed or ({-(-n * bits // 32)}, {groups}) int32 packed")
    zeros = zero_point.to(torch.int16) + midpoint(bits)
    if int(zeros.min()) < 0 or int(zeros.max()) >= 1 << bits:
        raise ValueError(f"weight_zero_point has values outside the signed {bits}-bit range")
    return zeros.to(torch.uint8)


def build_pack_quantized(parts: dict[str, torch.Tensor], num_bits: int, group_size: Optional[int], symmetric: bool,
                         strategy: str, actorder: Optional[str]) -> GroupQuantizedWeight:
    """One layer's pack-quantized tensors (keyed by suffix: weight_packed, weight_scale, weight_shape,
    and weight_zero_point / weight_g_idx where present) as a `GroupQuantizedWeight`."""
    if num_bits not in PACK_BITS:
        raise ValueError(f"num_bits={num_bits} is not supported for pack-quantized weights; supported: 4, 8")
    if strategy not in PACK_STRATEGIES:
        raise ValueError(f"weight strategy {strategy!r} is not supported for pack-quantized weights; "
                         f"supported: {', '.join(PACK_STRATEGIES)}")
    if actorder not in PACK_ACTORDERS:
        raise ValueError(f"actorder={actorder!r} is not supported; supported: group, weight, or none")
    missing = [s for s in ("weight_packed", "weight_scale", "weight_shape") if s not in parts]
    if missing:
        raise ValueError(f"missing tensors {', '.join(missing)}")
    shape = parts["weight_shape"].reshape(-1).tolist()
    if len(shape) != 2:
        raise ValueError(f"weight_shape must hold (out, in), got {shape}")
    n, k = int(shape[0]), int(shape[1])
    packed = parts["weight_packed"]
    if tuple(packed.shape) != (n, -(-k * num_bits // 32)):
        raise ValueError(f"weight_packed has shape {tuple(packed.shape)}, expected ({n}, {-(-k * num_bits // 32)})")
    codes = unpack_int32(packed, num_bits, dim=1)[:, :k]
    if strategy == "channel":
        group_size = k
    elif not group_size or group_size <= 0:
        raise ValueError(f"strategy 'group' needs a positive group_size, got {group_size!r}")
    groups = group_count(k, min(group_size, k))
    scales = float16_scales(parts["weight_scale"], "weight_scale")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"weight_scale has shape {tuple(scales.shape)}, expected ({n}, {groups})")
    zeros = None
    if not symmetric:
        if "weight_zero_point" not in parts:
            raise ValueError("an asymmetric weight needs weight_zero_point")
        zeros = symmetric_or(_zero_points(parts["weight_zero_point"], num_bits, n, groups), num_bits)
    perm = None
    if "weight_g_idx" in parts:
        perm = perm_from_g_idx(parts["weight_g_idx"], min(group_size, k))
    elif actorder == "group":
        raise ValueError("actorder 'group' needs weight_g_idx, which is missing")
    if perm is not None:
        codes = codes[:, perm]
    return GroupQuantizedWeight(num_bits, pack_codes(codes, num_bits), scales.contiguous(), zeros, group_size, k, perm)
