"""GGUF K-quant kernels (Q4_K, Q5_K, Q6_K) on every ISA path this CPU has: expansion bit-exact
against gguf's reference dequantize, and the fused decode / slab prefill matmuls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pagellm.layers.quantization import GGUF_KERNEL_TYPES
from pagellm.ops import gguf_cpu
from tests.test_quantized_weights import assert_matmul_close, isa, kernels  # noqa: F401 (fixtures)

Q = GGMLQuantizationType
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the float16 scales in each super-block: d, dmin (Q4_K/Q5_K); d at the end (Q6_K).
_HALVES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_kblocks(ggml_type: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random super-blocks: every code and sub-scale bit pattern, finite float16 d (and dmin)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in _HALVES[ggml_type]:
        halves = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def test_k_types_have_kernels():
    assert set(K_TYPES) <= GGUF_KERNEL_TYPES
    assert all(GGML_QUANT_SIZES[t][0] == 256 for t in K_TYPES)


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(isa, ggml_type):
    blocks = random_kblocks(ggml_type, 23, 768, seed=ggml_type.value)
    ref = torch.from_numpy(dequantize(blocks, ggml_type).reshape(23, 768).astype(np.float32))
    ours = gguf_cpu.gguf_dequantize(torch.from_numpy(blocks), int(ggml_type), 23, 768)
    assert ours.abs().max() > 0
    assert torch.equal(ours, ref), f"{int((ours != ref).sum())} values differ"


@pytest.mark.parametrize("ggml_type", K_TYPES, ids=lambda t: t.name)
def test_linear_decode_and_prefill(isa, ggml_type):
    # ragged output sizes (not multiples of the 8-row work chunks), 1..4 rows fused, 5 and 16 rows fused in tiles, 40 rows
    for n, k in ((1, 256), (13, 512), (67, 1024)):
        blocks = random_kblocks(ggml_type, n, k, seed=n + k)
        w = dequantize(blocks, ggml_type).reshape(n, k)
        for rows in (1, 2, 3, 4, 5, 16, 40):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows * 7 + n))
            out = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), n)
            assert out.shape == (rows, n) and out.dtype == torch.float32
            assert_matmul_close(out, x, w)


def test_bad_shapes_name_the_numbers():
    blocks = torch.from_numpy(random_kblocks(Q.Q4_K, 2, 256, seed=0))
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        gguf_cpu.gguf_linear(torch.randn(1, 128), blocks[:, :72].contiguous(), int(Q.Q4_K), 2)
    with pytest.raises(RuntimeError, match="has 288 bytes, expected 432"):
        gguf_cpu.gguf_linear(torch.randn(1, 256), blocks, int(Q.Q4_K), 3)
