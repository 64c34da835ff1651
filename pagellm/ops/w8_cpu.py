"""The 8-bit weight matmul kernels (`csrc/w8_ops.cpp`): int8 / FP8 codes with float32 scales.

Built on first use, called via torch.ops.pagellm_w8. Like the GGUF kernels it is compiled without
-march=native: each ISA path carries its own target attributes and the C++ picks one per call
from cpuid; `PAGELLM_CPU_ISA=scalar|avx2|avx512` forces a path.

- `w8a16_linear`: float activations, int8 or float8_e4m3fn weights, scales per row or per group
  of input columns; the weight rows are expanded to float32 (exactly `dequantize()`) 4 at a time.
- `w8a8_linear`: int8 weights with per-row scales; the activations are quantized to int8 in the
  op (per row, amax / 127, or one static scale) and the dots are int32 (VNNI `vpdpbusd` on
  AVX-512 VNNI CPUs, maddubs on AVX2).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "w8_ops.cpp"]
CFLAGS = ["-O3", "-fopenmp"]
ISA_NAMES = ("scalar", "avx2", "avx512")  # the C++ Isa enum, in order
ISA_ENV = "PAGELLM_CPU_ISA"


@functools.cache
def load_w8_ops() -> bool:
    """Builds (or loads the cached build of) the kernels; True when torch.ops.pagellm_w8 is ready."""
    if hasattr(torch.ops.pagellm_w8, "w8a8_linear"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(name="pagellm_w8_ops", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler: the weights are multiplied by torch ops instead
        lines = str(exc).strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("8-bit weight CPU kernels unavailable (%s: %s)", type(exc).__name__, why.strip())
        return False
    return True


def supported_isas() -> list[str]:
    mask = int(torch.ops.pagellm_w8.supported_isas())
    return [name for i, name in enumerate(ISA_NAMES) if mask >> i & 1]


def active_isa() -> str:
    return ISA_NAMES[int(torch.ops.pagellm_w8.isa())]


def has_vnni() -> bool:
    """AVX-512 VNNI present: the avx512 path of `w8a8_linear` uses vpdpbusd (else the AVX2 code)."""
    return bool(torch.ops.pagellm_w8.has_vnni())


def w8a16_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (..., K) times codes (N, K) int8 | float8_e4m3fn with scale (N, G) float32 over groups of
    `group_size` input columns (the last may be short); float32 (..., N)."""
    return torch.ops.pagellm_w8.w8a16_linear(x, codes, scale, group_size)


def w8a8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor,
                has_min_code: bool, input_scale: Optional[float] = None) -> torch.Tensor:
    """x (..., K) quantized to int8 (per row, or with the static `input_scale`) times int8 codes
    (N, K) with per-row float32 scales; `row_sums` (int32, per row) and `has_min_code` (a -128
    code somewhere) are precomputed at load. float32 (..., N)."""
    return torch.ops.pagellm_w8.w8a8_linear(x, codes, scale, row_sums, has_min_code,
                                            0.0 if input_scale is None else float(input_scale))
