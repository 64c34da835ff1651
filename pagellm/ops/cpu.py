"""The engine's C++ CPU kernels (`csrc/cpu_ops.cpp`, `csrc/rotary_ops.cpp`): built on first use,
then called via torch.ops.

torch.utils.cpp_extension compiles the files with the machine's C++ compiler (about 30 s once;
the result is cached under ~/.cache/torch_extensions, rebuilt when the source or its headers
change). Where the build fails (no compiler), `load_cpu_ops()` says why once and returns False;
callers fall back to the pure-torch code, which stays the reference these kernels are tested against.

Like the GGUF kernels the file is compiled without -march=native: the AVX-512, AVX2+FMA and
scalar paths carry their own target attributes and each call picks one from cpuid
(`csrc/cpu_isa.h`), so one build runs on any x86-64 CPU. `PAGELLM_CPU_ISA=scalar|avx2|avx512`
(read on every call) forces a path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from pagellm.layers.utils import call_on_layers

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_ops.cpp", "rotary_ops.cpp")]
# OpenMP gives at::parallel_for its threads (torch's own runtime, already loaded).
CFLAGS = ["-O3", "-fopenmp"]
ISA_NAMES = ("scalar", "avx2", "avx512")  # cpu_isa.h's Isa enum, in order
ISA_ENV = "PAGELLM_CPU_ISA"


@functools.cache
def load_cpu_ops() -> bool:
    """Builds (or loads the cached build of) the kernels; True when torch.ops.pagellm_cpu is ready."""
    if hasattr(torch.ops.pagellm_cpu, "paged_decode_attention"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(name="pagellm_cpu_ops", sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: run on the torch code instead
        lines = str(exc).strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("C++ CPU kernels unavailable (%s: %s); using the pure-torch code paths",
                       type(exc).__name__, why.strip())
        return False
    return True


def supported_isas() -> list[str]:
    """The kernel paths this CPU can run, e.g. ["scalar", "avx2"]."""
    mask = int(torch.ops.pagellm_cpu.supported_isas())
    return [name for i, name in enumerate(ISA_NAMES) if mask >> i & 1]


def active_isa() -> str:
    """The path the next call will take (the best supported one unless PAGELLM_CPU_ISA says otherwise)."""
    return ISA_NAMES[int(torch.ops.pagellm_cpu.isa())]


def enable_cpu_kernels(model: torch.nn.Module) -> int:
    """Switches every layer that has a C++ CPU kernel (RMSNorm, SiLU-and-mul, rotary embedding) to it;
    returns the count."""
    return call_on_layers(model, "enable_cpu_kernel")
