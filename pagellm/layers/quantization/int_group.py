"""Group-wise integer weights (GPTQ, AWQ, compressed-tensors pack-quantized), kept quantized.

Every such checkpoint is converted at load into one fixed layout, `GroupQuantizedWeight`, which
the CUDA kernel (`pagellm.ops.triton_quant_matmul.group_matmul`) consumes as is and the CPU path
repacks once into GGUF blocks (`pagellm/ops/int_group_cpu.py`):

- `qweight` uint8: 4-bit (N, K/2), byte j of row n holds input 2j in its low nibble and 2j+1 in
  its high nibble; 8-bit (N, K), one unsigned code per byte.
- `scales` float16 (N, ceil(K/G)); G = K for a per-channel (group_size -1) checkpoint; when G does
  not divide K the last group is narrower.
- `zeros` None (symmetric: the zero point is 8 for 4-bit, 128 for 8-bit) or uint8, as scales.
- `perm` None or int64 (K,) for act-order checkpoints: stored column j holds input feature
  perm[j] (columns sorted by group, so every group is contiguous), i.e. the product is
  x[..., perm] @ W_stored.T.

value = (code - zero) * scale.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.quantization.base import QuantizedLinearMethod, QuantizedWeight

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)


def midpoint(bits: int) -> int:
    """The implicit zero point of a symmetric weight."""
    return 1 << (bits - 1)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 codes from the fixed layout's qweight."""
    if bits == 8:
        return qweight
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The fixed layout's qweight from (N, K) codes (any integer dtype, values < 2**bits)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The `bits`-bit fields of an int32 tensor, low bits first, laid out along `dim` (each int32
    becomes 32/bits consecutive entries there): uint8, `dim` grown 32/bits times."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensor must be int32, got {packed.dtype}")
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., per_word): arithmetic shift, masked
    fields = fields.movedim(dim, -2)  # (..., size, per_word) with `dim` next to the fields
    fields = fields.reshape(*fields.shape[:-2], -1).movedim(-1, dim)
    return fields.to(torch.uint8)


def group_count(in_features: int, group_size: int) -> int:
    """Groups per row: the last one is narrower when group_size does not divide in_features (as
    GPTQ stores a 576-wide layer with group_size 128: four groups of 128 and one of 64)."""
    return -(-in_features // group_size)


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> Optional[torch.Tensor]:
    """The act-order permutation of a checkpoint's g_idx (group of input k is g_idx[k]), or None when
    the groups are already contiguous. Raises ValueError unless every group is `group_size` wide
    (the last one: what is left)."""
    g_idx = g_idx.to(torch.int64).reshape(-1)
    k = g_idx.numel()
    groups = group_count(k, group_size)
    if torch.equal(g_idx, torch.arange(k) // group_size):
        return None
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"g_idx has groups outside [0, {groups})")
    expected = torch.full((groups,), group_size)
    expected[-1] = k - (groups - 1) * group_size
    if not torch.equal(torch.bincount(g_idx, minlength=groups), expected):
        raise ValueError(f"g_idx does not put group_size={group_size} input features in every group")
    return torch.argsort(g_idx, stable=True)


class GroupQuantizedWeight(QuantizedWeight):
    """A (N, K) weight of `bits`-bit codes with a float16 scale (and zero point) per G inputs."""

    def __init__(self, bits: int, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, in_features: int, perm: Optional[torch.Tensor] = None) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        k = in_features
        if group_size == -1 or group_size > k:
            group_size = k
        if group_size <= 0:
            raise ValueError(f"group_size={group_size}: must be positive, or -1 for one group per row")
        if k <= 0 or k * bits % 8 or qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 8 != k * bits:
            raise ValueError(f"qweight must be uint8 (N, {k * bits / 8:g}) for {k} {bits}-bit inputs, "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        n, groups = qweight.shape[0], group_count(k, group_size)
        if scales.dtype != torch.float16 or tuple(scales.shape) != (n, groups):
            raise ValueError(f"scales must be float16 ({n}, {groups}), got {scales.dtype} {tuple(scales.shape)}")
        if zeros is not None:
            if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n, groups):
                raise ValueError(f"zeros must be uint8 ({n}, {groups}), got {zeros.dtype} {tuple(zeros.shape)}")
            if zeros.numel() and int(zeros.max()) >= 1 << bits:
                raise ValueError(f"zero points must be below 2**bits={1 << bits}")
        if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (k,)):
            raise ValueError(f"perm must be int64 ({k},), got {perm.dtype} {tuple(perm.shape)}")
        self.bits, self.group_size = bits, group_size
        self.qweight, self.scales, self.zeros, self.perm = qweight, scales, zeros, perm
        self.shape = torch.Size((n, k))

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)

    def dequantize_stored(self) -> torch.Tensor:
        """float32 (N, K) in stored column order (the order `perm` permutes x into)."""
        codes = unpack_codes(self.qweight, self.bits).float()
        zeros = self.zeros.float() if self.zeros is not None else torch.full_like(self.scales, midpoint(self.bits),
                                                                                    dtype=torch.float32)
        k, g = self.shape[1], self.group_size
        return (codes - zeros.repeat_interleave(g, 1)[:, :k]) * self.scales.float().repeat_interleave(g, 1)[:, :k]

    def dequantize(self) -> torch.Tensor:
        w = self.dequantize_stored()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def narrow(self, dim: int, start: int, length: int) -> Union["GroupQuantizedWeight", torch.Tensor]:
        """Rows always cut cleanly; input columns when the cut is whole groups and there is no
        act-order permutation (which scatters an input range over every group)."""
        if dim == 0:
            rows = slice(start, start + length)
            return GroupQuantizedWeight(self.bits, self.qweight[rows].clone(), self.scales[rows].clone(),
                                        None if self.zeros is None else self.zeros[rows].clone(),
                                        self.group_size, self.shape[1], self.perm)
        if dim != 1:
            raise ValueError(f"a group-quantized weight has 2 dims; cannot narrow dim {dim}")
        g, k = self.group_size, self.shape[1]
        if self.perm is not None or start % g or (length % g and start + length != k) or start * self.bits % 8:
            why = "it is act-order (g_idx) permuted" if self.perm is not None else f"they are not whole {g}-input groups"
            logger.warning("group-quantized weight %s: input columns [%d, %d) cannot be cut quantized (%s); "
                           "dequantizing it before the tensor-parallel split", tuple(self.shape), start,
                           start + length, why)
            return self.dequantize().narrow(1, start, length).clone()
        per_byte = 8 // self.bits
        cols = slice(start // per_byte, (start + length) // per_byte)
        groups = slice(start // g, start // g + group_count(length, g))
        return GroupQuantizedWeight(self.bits, self.qweight[:, cols].contiguous(), self.scales[:, groups].contiguous(),
                                    None if self.zeros is None else self.zeros[:, groups].contiguous(),
                                    g, length)

    def linear_method(self, layer: nn.Module) -> "GroupQuantizedLinearMethod":
        return GroupQuantizedLinearMethod()


def fuse_group_weights(parts: list[QuantizedWeight]) -> Optional[GroupQuantizedWeight]:
    """The parts' rows stacked (merged q/k/v, gate/up), or None when bits, group size, input width or
    permutation differ. A symmetric part among asymmetric ones gets its implicit zero points written out."""
    if not all(isinstance(p, GroupQuantizedWeight) for p in parts):
        return None
    first = parts[0]
    if len(parts) == 1:
        return first
    for p in parts[1:]:
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and torch.equal(p.perm, first.perm))
        if (p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]) or not same_perm:
            return None
    zeros = None
    if any(p.zeros is not None for p in parts):
        zeros = torch.cat([p.zeros if p.zeros is not None else torch.full_like(p.scales, midpoint(p.bits),
                                                                                 dtype=torch.uint8) for p in parts])
    return GroupQuantizedWeight(first.bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                                zeros, first.group_size, first.shape[1], first.perm)


@functools.cache
def _triton_group_matmul():
    """The Triton kernel's entry point, or None where it is not built (looked up once)."""
    try:
        from pagellm.ops.triton_quant_matmul import group_matmul
    except ImportError:
        return None
    return group_matmul


def _cuda_linear(x: torch.Tensor, weight: GroupQuantizedWeight) -> torch.Tensor:
    """x (..., K) times the weight on a GPU: the Triton W4A16/W8A16 kernel where it is built, else
    dequantize-then-matmul (correct, not fast)."""
    xp = x if weight.perm is None else x.index_select(-1, weight.perm)
    group_matmul = _triton_group_matmul()
    if group_matmul is not None:
        return group_matmul(xp, weight.qweight, weight.scales, weight.zeros, weight.group_size, weight.bits)
    return F.linear(xp, weight.dequantize_stored().to(x.dtype))


class GroupQuantizedLinearMethod(QuantizedLinearMethod):
    """A linear layer on a `GroupQuantizedWeight`.

    `install` registers the fixed layout as buffers (so `.to(device)` moves it); on the CPU,
    `process_after_loading` repacks it once into GGUF Q4_0/Q8_0 blocks for the C++ kernels and
    drops the fixed layout (see `pagellm/ops/int_group_cpu.py`); on a GPU it stays as is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bits = 0
        self.group_size = 0
        self.in_features = 0
        self.cpu = None  # the CPU form once repacked (an int_group_cpu.CpuGroupWeight)
        self._installed: Optional[GroupQuantizedWeight] = None

    def fuse(self, parts: list[QuantizedWeight]) -> Optional[QuantizedWeight]:
        return fuse_group_weights(parts)

    def install(self, layer: nn.Module, weight: QuantizedWeight) -> None:
        assert isinstance(weight, GroupQuantizedWeight)
        self.bits, self.group_size, self.in_features = weight.bits, weight.group_size, weight.shape[1]
        layer.register_buffer("qweight", weight.qweight, persistent=False)
        layer.register_buffer("scales", weight.scales, persistent=False)
        layer.register_buffer("qzeros", weight.zeros, persistent=False)
        layer.register_buffer("perm", weight.perm, persistent=False)
        self.cpu = self._installed = None

    def installed_weight(self, layer: nn.Module) -> GroupQuantizedWeight:
        """The fixed layout, from the layer's buffers (before any CPU repack); built once per
        placement, since building validates (a device sync on a GPU)."""
        cached = self._installed
        if cached is not None and cached.qweight is layer.qweight and cached.scales is layer.scales:
            return cached
        self._installed = GroupQuantizedWeight(self.bits, layer.qweight, layer.scales, layer.qzeros, self.group_size,
                                               self.in_features, layer.perm)
        return self._installed

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.dense and self.cpu is None and layer.qweight is not None and layer.qweight.device.type == "cpu":
            self._repack_for_cpu(layer)

    def _repack_for_cpu(self, layer: nn.Module) -> None:
        from pagellm.ops.int_group_cpu import CpuGroupWeight

        self.cpu = CpuGroupWeight.from_weight(self.installed_weight(layer))
        for name, tensor in self.cpu.buffers().items():
            layer.register_buffer(name, tensor, persistent=False)
        if self.cpu.keeps_fixed_layout:
            return
        for name in ("qweight", "scales", "qzeros"):  # the blocks replace them
            layer.register_buffer(name, None, persistent=False)
        self._installed = None

    def use_tiles(self, layer: nn.Module) -> bool:
        """CPU: the repacked Q4_0/Q8_0 blocks in the tiled kernels' 16-row tiles (EngineConfig.cpu_gguf_tiles)."""
        if self.cpu is None or not self.cpu.use_tiles():
            return False
        layer.register_buffer("gguf_blocks", self.cpu.blocks, persistent=False)
        return True

    def apply_quantized(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _cuda_linear(x, self.installed_weight(layer))
        if self.cpu is None:  # a layer used without the post-load step
            self._repack_for_cpu(layer)
        return self.cpu.linear(x, layer, getattr(layer, "int8_activations", False))

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes the layer's quantized weight occupies now (fixed layout, or its CPU form)."""
        names = ("qweight", "scales", "qzeros", "perm", *(self.cpu.buffers() if self.cpu is not None else ()))
        tensors = {name: getattr(layer, name, None) for name in names}
        return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))
