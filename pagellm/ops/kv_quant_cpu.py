"""The quantized-KV-cache decode kernels (`csrc/kv_quant_ops.cpp`): built on first use, called via torch.ops.

Like `gguf_cpu.py`'s kernels, compiled without -march=native (each row loop has a scalar and an
AVX2 path chosen at run time; `PAGELLM_CPU_ISA=scalar|avx2` forces one), so one cached build runs
on any x86-64 CPU. Where the build fails, `load_kv_quant_ops()` says why once and returns False;
the CPU backend then decodes through the torch reference code.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch

from pagellm.attention.kv_quant import KVQuant

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "kv_quant_ops.cpp"
CFLAGS = ["-O3", "-fopenmp"]
ISA_NAMES = ("scalar", "avx2")  # the C++ Isa enum, in order


@functools.cache
def load_kv_quant_ops() -> bool:
    """Builds (or loads the cached build of) the kernels; True when torch.ops.pagellm_kvq is ready."""
    if hasattr(torch.ops.pagellm_kvq, "paged_decode_attention_fp8"):
        return True
    try:
        from torch.utils.cpp_extension import load

        load(name="pagellm_kvq_ops", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler or a broken toolchain: the torch code decodes instead
        lines = str(exc).strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])
        logger.warning("quantized-KV C++ kernels unavailable (%s: %s); decoding with torch", type(exc).__name__,
                       why.strip())
        return False
    return True


def active_isa() -> str:
    """The path the next call takes (the best supported one unless PAGELLM_CPU_ISA says otherwise)."""
    return ISA_NAMES[int(torch.ops.pagellm_kvq.isa())]


def quantized_decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               sliding_window: Optional[int], logit_softcap: Optional[float],
                               quant: KVQuant) -> None:
    """out/q: [B, Hq, D] contiguous; caches [blocks, block_size, Hkv, D] (fp8 or int8, per `quant`);
    tables [B, n] and lens [B] int32."""
    window, softcap = sliding_window or 0, logit_softcap or 0.0
    if quant.kind == "fp8":
        torch.ops.pagellm_kvq.paged_decode_attention_fp8(out, q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                         window, softcap, quant.k_scale, quant.v_scale)
    else:
        torch.ops.pagellm_kvq.paged_decode_attention_int8(out, q, k_cache, v_cache, quant.scales[0], quant.scales[1],
                                                          block_tables, seq_lens, scale, window, softcap)
