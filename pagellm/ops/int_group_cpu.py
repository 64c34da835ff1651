"""Group-quantized weights on the CPU: repacked once into GGUF blocks, multiplied by the GGUF kernels.

A 4-bit weight with G a multiple of 32 is exactly a Q4_0 weight: each 32-input block takes its
group's float16 scale as d and its codes as they are (Q4_0 computes (q - 8) * d); an 8-bit one
is exactly Q8_0 with int8 codes q - 128. An asymmetric weight's zero point z differs from that
implicit 8 (128), so

    sum_k (q_k - z) s x_k = sum_k (q_k - 8) s x_k  -  sum_g (z_g - 8) s_g sum_{k in g} x_k,

the block kernel's product minus a (M, K/G) x (K/G, N) correction: the per-group sums of x times
C = (z - 8) * s (one addmm per call, exact to float32 rounding). C is kept as float32 when that
costs at most 1/32 byte per weight (G >= 128); for smaller groups it would add 20% to the weight
(4 bytes per 32 weights), so the int8 offsets z - 8 and the float16 scales are kept instead
(3 bytes per group) and C is formed per call (measured: about +13 us per call at N=1536, G=32).
Act order multiplies x[..., perm] with the stored columns. Other group sizes (G not a multiple of
32, or K not) keep the fixed layout and are dequantized per call in row chunks (slow, exact).

Measured (scripts/bench_int_group.py, one thread, K=576, 4-bit): the Q4_0 repack is the fastest
exact path; torch's _weight_int4pack_mm_for_cpu is faster for decode in bfloat16 but rounds the
float16 scales, zeros and activations to bfloat16, and is ~30x slower in float32.
`scripts/bench_int_group.py` measures these against dense F.linear and torch's int4pack kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pagellm.layers.quantization.int_group import GroupQuantizedWeight, midpoint, unpack_codes
from pagellm.ops.gguf_cpu import gguf_linear, gguf_tiled_linear, gguf_tiled_repack, load_gguf_ops

GGUF_BLOCK = 32
GGML_Q4_0, GGML_Q8_0 = 2, 8
DEQUANT_ROWS = 256  # rows expanded at a time by the fallback: bounds its float32 scratch
CACHED_CORRECTION_MIN_GROUP = 128  # float32 C costs 4/G bytes per weight: cached from G = 128 up


def gguf_blocks(weight: GroupQuantizedWeight) -> torch.Tensor:
    """The weight's stored columns as (N, K/32 * bytes) GGUF Q4_0 (4-bit) or Q8_0 (8-bit) blocks,
    each block's d its group's scale and its codes centred on the symmetric zero point."""
    n, k = weight.shape
    blocks = k // GGUF_BLOCK
    codes = unpack_codes(weight.qweight, weight.bits).reshape(n, blocks, GGUF_BLOCK)
    d = weight.scales.repeat_interleave(weight.group_size // GGUF_BLOCK, dim=1)[:, :blocks].contiguous()
    d_bytes = d.view(torch.uint8).reshape(n, blocks, 2)
    if weight.bits == 4:  # ggml Q4_0: byte j holds value j (low nibble) and value j + 16 (high)
        qs = codes[..., :16] | (codes[..., 16:] << 4)
    else:
        qs = (codes.to(torch.int16) - midpoint(8)).to(torch.int8).view(torch.uint8)
    return torch.cat([d_bytes, qs], dim=-1).reshape(n, -1).contiguous()


def zero_offsets(weight: GroupQuantizedWeight) -> Optional[torch.Tensor]:
    """z - midpoint as int8 (N, groups); None for a symmetric weight (or zero points all at the midpoint)."""
    if weight.zeros is None:
        return None
    offsets = (weight.zeros.to(torch.int16) - midpoint(weight.bits)).to(torch.int8)
    return offsets if bool(offsets.any()) else None


def kernel_fits(weight: GroupQuantizedWeight) -> bool:
    """The GGUF kernels take it when every group is whole 32-input blocks (and they built)."""
    return weight.group_size % GGUF_BLOCK == 0 and weight.shape[1] % GGUF_BLOCK == 0 and load_gguf_ops()


@dataclass
class CpuGroupWeight:
    """The CPU form of a layer's group-quantized weight."""

    shape: torch.Size
    group_size: int
    perm: Optional[torch.Tensor]
    blocks: Optional[torch.Tensor] = None  # GGUF blocks (of ggml_type), or None for the fallback:
    ggml_type: int = -1
    tiled: bool = False  # blocks rearranged into the tiled kernels' 16-row tiles (`use_tiles`)
    fallback: Optional[GroupQuantizedWeight] = None  # the fixed layout, dequantized per call
    # Asymmetric only: C = (z - midpoint) * s as float32 (N, groups), or its int8 and float16 factors
    correction: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None

    @classmethod
    def from_weight(cls, weight: GroupQuantizedWeight) -> "CpuGroupWeight":
        if not kernel_fits(weight):
            return cls(weight.shape, weight.group_size, weight.perm, fallback=weight)
        cpu = cls(weight.shape, weight.group_size, weight.perm, gguf_blocks(weight),
                  GGML_Q4_0 if weight.bits == 4 else GGML_Q8_0)
        offsets = zero_offsets(weight)
        if offsets is not None and weight.group_size >= CACHED_CORRECTION_MIN_GROUP:
            cpu.correction = (offsets.float() * weight.scales.float()).contiguous()
        elif offsets is not None:
            cpu.offsets, cpu.scales = offsets, weight.scales
        return cpu

    def use_tiles(self) -> bool:
        """Rearranges the Q4_0/Q8_0 blocks into 16-row tiles (same bytes, faster kernels); True when tiled."""
        if self.blocks is not None and not self.tiled:
            self.blocks = gguf_tiled_repack(self.blocks, self.ggml_type, self.shape[0], self.shape[1])
            self.tiled = True
        return self.tiled

    @property
    def keeps_fixed_layout(self) -> bool:
        return self.blocks is None

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors it adds to the layer (registered as buffers, so weight accounting sees them)."""
        if self.blocks is None:
            return {}
        extra = {"zero_correction": self.correction, "zero_offsets": self.offsets, "group_scales": self.scales}
        return {"gguf_blocks": self.blocks, **{name: t for name, t in extra.items() if t is not None}}

    def linear(self, x: torch.Tensor, layer=None, int8_activations: bool = False) -> torch.Tensor:
        """x (..., K) times the weight, in x's dtype."""
        n, k = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.blocks is None:
            out = self._dequantized_linear(x2.float())
        else:
            matmul = gguf_tiled_linear if self.tiled else gguf_linear
            out = matmul(x2, self.blocks, self.ggml_type, n, int8_activations)
            correction = self.correction
            if correction is None and self.offsets is not None:
                correction = self.offsets.float() * self.scales.float()
            if correction is not None:
                groups = correction.shape[1]
                xf = x2.float()
                if groups * self.group_size != k:  # a narrower last group: pad it with zeros
                    xf = F.pad(xf, (0, groups * self.group_size - k))
                group_sums = xf.reshape(x2.shape[0], groups, -1).sum(-1)
                out = torch.addmm(out, group_sums, correction.T, alpha=-1)
        return out.reshape(*lead, n).to(x.dtype)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fallback
        out = x.new_empty(x.shape[0], w.shape[0])
        for start in range(0, w.shape[0], DEQUANT_ROWS):
            rows = w.narrow(0, start, min(DEQUANT_ROWS, w.shape[0] - start))
            out[:, start:start + rows.shape[0]] = F.linear(x, rows.dequantize_stored())
        return out
