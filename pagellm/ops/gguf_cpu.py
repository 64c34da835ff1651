"""The GGUF block-format matmul kernels (`csrc/gguf_ops.cpp`, K-quants in `csrc/gguf_kquant_ops.cpp`).

Built on first use, called via torch.ops.

Unlike `cpu.py`'s kernels this file is compiled without -march=native: each ISA path (AVX-512,
AVX2+FMA, scalar) carries its own target attributes and the C++ picks one at run time from cpuid,
so one cached build runs on any x86-64 CPU. `PAGELLM_CPU_ISA=scalar|avx2|avx512` forces a path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# 32-value block types; K-quants; int8-activation variants of the 32-value types; the 16-row tiled
# layout of Q4_0/Q4_1/Q8_0
SOURCES = [CSRC / "gguf_ops.cpp", CSRC / "gguf_kquant_ops.cpp", CSRC / "gguf_int8act_ops.cpp",
           CSRC / "gguf_tiled_ops.cpp"]
# No fp contraction: the K-quant expansion must round like gguf's reference (mul, then sub).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
ISA_NAMES = ("scalar", "avx2", "avx512")  # the C++ Isa enum, in order
ISA_ENV = "PAGELLM_CPU_ISA"


@functools.cache
def load_gguf_ops() -> bool:
    """Builds (or loads the cached build of) the kernels; True when torch.ops.pagellm_gguf is ready."""
    if hasattr(torch.ops.pagellm_gguf, "linear"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(name="pagellm_gguf_ops", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler or a broken toolchain: GGUF weights get dequantized at load
        lines = str(exc).strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("GGUF CPU kernels unavailable (%s: %s)", type(exc).__name__, why.strip())
        return False
    return True


def supported_isas() -> list[str]:
    """The kernel paths this CPU can run, e.g. ["scalar", "avx2", "avx512"]."""
    mask = int(torch.ops.pagellm_gguf.supported_isas())
    return [name for i, name in enumerate(ISA_NAMES) if mask >> i & 1]


def active_isa() -> str:
    """The path the next call will take (the best supported one unless PAGELLM_CPU_ISA says otherwise)."""
    return ISA_NAMES[int(torch.ops.pagellm_gguf.isa())]


def gguf_linear(x: torch.Tensor, weight: torch.Tensor, ggml_type: int, out_features: int,
                int8_activations: bool = False) -> torch.Tensor:
    """x (..., K) times the (out_features, K) block-quantized weight (uint8 bytes); float32 out.

    int8_activations: up to 16 rows of a 32-value block type (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) quantize x
    per 32-value block to int8 and use integer dot products (llama.cpp's trade: faster, no longer
    exact); other types and larger batches ignore it."""
    return torch.ops.pagellm_gguf.linear(x, weight, ggml_type, out_features, int8_activations)


def gguf_dequantize(weight: torch.Tensor, ggml_type: int, out_features: int, in_features: int) -> torch.Tensor:
    return torch.ops.pagellm_gguf.dequantize(weight, ggml_type, out_features, in_features)


# The ggml types with a 16-row tiled layout (csrc/gguf_tiled_ops.cpp): Q4_0, Q4_1, Q8_0.
TILED_TYPES = frozenset({2, 3, 8})


def gguf_tiled_repack(weight: torch.Tensor, ggml_type: int, out_features: int, in_features: int) -> torch.Tensor:
    """The (out_features, in_features) GGUF blocks rearranged into 16-row tiles (same bytes, rows
    padded to a multiple of 16): the CPU layout the tiled kernels read."""
    return torch.ops.pagellm_gguf.tiled_repack(weight, ggml_type, out_features, in_features)


def gguf_tiled_linear(x: torch.Tensor, weight: torch.Tensor, ggml_type: int, out_features: int,
                      int8_activations: bool = False) -> torch.Tensor:
    """x (..., K) times a tiled weight; float32 out. int8_activations: x quantized per 32-value block
    to int8 (integer dot products, VNNI where the CPU has it) for every row count."""
    return torch.ops.pagellm_gguf.tiled_linear(x, weight, ggml_type, out_features, int8_activations)


def gguf_tiled_dequantize(weight: torch.Tensor, ggml_type: int, out_features: int, in_features: int) -> torch.Tensor:
    return torch.ops.pagellm_gguf.tiled_dequantize(weight, ggml_type, out_features, in_features)
