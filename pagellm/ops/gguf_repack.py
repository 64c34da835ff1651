"""GGUF 32-value blocks (Q4_0, Q4_1, Q8_0) repacked into the group-GEMM layout of `triton_quant_matmul`.

The group layout: `qweight` uint8, 4-bit as (N, K/2) with input k = 2j in the low nibble of
byte j and k = 2j + 1 in the high nibble, 8-bit as (N, K) unsigned codes; `scales` (N, K/32);
`zeros` None (symmetric: 8 or 128) or (N, K/32) floats. value = (code - zero) * scale.

GGUF blocks store 16 bytes of nibbles where byte i holds value i (low) and value i + 16 (high),
so the nibbles are reordered, not just copied. Pure torch: runs wherever the weights are.
"""

from __future__ import annotations

from typing import Optional

import torch

GGUF_BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def _blocks(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, row_bytes) uint8 -> (N, K/32, block_bytes), with shape errors that name the format."""
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"repack_gguf_{kind}: raw must be a 2-D uint8 tensor (rows, row bytes), got "
                         f"{tuple(raw.shape)} {raw.dtype}")
    size = _BLOCK_BYTES[kind]
    if raw.shape[1] % size:
        raise ValueError(f"repack_gguf_{kind}: row bytes ({raw.shape[1]}) must be a multiple of the "
                         f"{size}-byte block")
    return raw.contiguous().view(raw.shape[0], raw.shape[1] // size, size)


def _fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 stored at byte `offset` of every block, as (N, K/32) float16."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1)


def _gguf_nibbles_to_codes(qs: torch.Tensor) -> torch.Tensor:
    """(N, B, 16) GGUF nibble bytes -> (N, B*32) codes in value order (byte i: values i and i+16)."""
    low, high = qs & 0x0F, qs >> 4
    return torch.cat([low, high], dim=-1).reshape(qs.shape[0], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8: k = 2j in the low nibble of byte j, 2j + 1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def repack_gguf_q4_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Q4_0 blocks (fp16 d, 16 nibble bytes; value = d * (q - 8)) -> (qweight, scales fp16, zeros=None).

    Exact: the kernel computes (q - 8) * d in fp32, the same product gguf's reference forms.
    """
    blocks = _blocks(raw, "q4_0")
    return pack_int4(_gguf_nibbles_to_codes(blocks[..., 2:])), _fp16_field(blocks, 0), None


def repack_gguf_q4_1(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 blocks (fp16 d, fp16 m, 16 nibble bytes; value = d * q + m) -> (qweight, scales fp16, zeros fp32).

    zero = -m / d, so (q - zero) * d = d * q + m up to fp32 rounding. A block with d == 0 holds the
    constant m (llama.cpp writes such blocks with all codes 0): its codes become 0, its scale m and
    its zero -1, which gives m exactly instead of dividing by zero.
    """
    blocks = _blocks(raw, "q4_1")
    d, m = _fp16_field(blocks, 0), _fp16_field(blocks, 2)
    codes = _gguf_nibbles_to_codes(blocks[..., 4:])
    flat = d == 0
    if bool(flat.any()):
        codes = codes.masked_fill(flat.repeat_interleave(GGUF_BLOCK, dim=1), 0)
    scales = torch.where(flat, m, d)
    zeros = torch.where(flat, torch.full_like(d, -1.0, dtype=torch.float32),
                        -m.float() / torch.where(flat, torch.ones_like(d), d).float())
    return pack_int4(codes), scales, zeros


def repack_gguf_q8_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Q8_0 blocks (fp16 d, 32 int8; value = d * q) -> (qweight (N, K) uint8 = q + 128, scales fp16, zeros=None)."""
    blocks = _blocks(raw, "q8_0")
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(blocks.shape[0], -1)
    return (q.to(torch.int16) + 128).to(torch.uint8), _fp16_field(blocks, 0), None


# ggml type id -> (repack, bits): the GGUF block types the group GEMM can run as they are.
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
_REPACKS = {GGML_Q4_0: (repack_gguf_q4_0, 4), GGML_Q4_1: (repack_gguf_q4_1, 4), GGML_Q8_0: (repack_gguf_q8_0, 8)}


def repackable_gguf_types() -> tuple[int, ...]:
    return tuple(_REPACKS)


def repack_gguf(raw: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """(qweight, scales, zeros, bits) for `group_matmul(x, qweight, scales, zeros, GGUF_BLOCK, bits)`."""
    if ggml_type not in _REPACKS:
        raise ValueError(f"repack_gguf: ggml type {ggml_type} has no group-GEMM layout; supported: "
                         f"{sorted(_REPACKS)} (Q4_0, Q4_1, Q8_0)")
    repack, bits = _REPACKS[ggml_type]
    qweight, scales, zeros = repack(raw)
    return qweight, scales, zeros, bits
