"""The engine's C++ CPU kernels (`csrc/cpu_ops.cpp`): built on first use, then called via torch.ops.

torch.utils.cpp_extension compiles the file with the machine's C++ compiler (about 30 s once;
the result is cached under ~/.cache/torch_extensions, keyed by the source). Where the build
fails (no compiler), `load_cpu_ops()` says why once and returns False; callers fall back to
the pure-torch code, which stays the reference these kernels are tested against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

from pagellm.layers.utils import call_on_layers

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
# -march=native: the build runs on the machine that uses it. OpenMP gives at::parallel_for its
# threads (torch's own runtime, already loaded).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_signature() -> str:
    """A short hash of the CPU's feature flags. torch caches builds by source and flags only, and a
    -march=native build loaded on a CPU without the same instructions dies with SIGILL."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


@functools.cache
def load_cpu_ops() -> bool:
    """Builds (or loads the cached build of) the kernels; True when torch.ops.pagellm_cpu is ready."""
    if hasattr(torch.ops.pagellm_cpu, "paged_decode_attention"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(name=f"pagellm_cpu_ops_{_cpu_signature()}", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: run on the torch code instead
        lines = str(exc).strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("C++ CPU kernels unavailable (%s: %s); using the pure-torch code paths",
                       type(exc).__name__, why.strip())
        return False
    return True


def enable_cpu_kernels(model: torch.nn.Module) -> int:
    """Switches every layer that has a C++ CPU kernel (RMSNorm, SiLU-and-mul) to it; returns the count."""
    return call_on_layers(model, "enable_cpu_kernel")
