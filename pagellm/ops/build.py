"""Builds every C++ CPU kernel library at once, each in its own process, so the compiles overlap.

Each library is otherwise built on first use, one after another (about a minute in all on 2 cores,
most of it single-file compiles that leave the other core idle). Building them side by side first
(the test suite does, at session start; `python -m pagellm.ops.build` by hand) fills the cache
torch.utils.cpp_extension keeps, so every later load, in any process, is a cache hit. A library
that fails to build is only reported: its first use then says why and falls back to torch code.
"""

from __future__ import annotations

import subprocess
import sys
import time

# (module, loader): the four libraries, the largest (GGUF, four source files) first.
LIBRARIES = (
    ("pagellm.ops.gguf_cpu", "load_gguf_ops"),
    ("pagellm.ops.cpu", "load_cpu_ops"),
    ("pagellm.ops.w8_cpu", "load_w8_ops"),
    ("pagellm.ops.kv_quant_cpu", "load_kv_quant_ops"),
)


def build_cpu_kernels(timeout_s: float = 600.0) -> dict[str, bool]:
    """Builds (or finds cached) every library in parallel; {module: built}."""
    procs = {module: subprocess.Popen(
        [sys.executable, "-c", f"import sys; from {module} import {loader}; sys.exit(0 if {loader}() else 1)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for module, loader in LIBRARIES}
    deadline = time.monotonic() + timeout_s
    built = {}
    for module, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err = "timed out"
        built[module] = proc.returncode == 0
        if not built[module]:
            print(f"{module}: kernels not built ({(err or '').strip().splitlines()[-1:] or 'no message'})",
                  file=sys.stderr)
    return built


if __name__ == "__main__":
    start = time.perf_counter()
    result = build_cpu_kernels()
    print(f"built {sum(result.values())}/{len(result)} kernel libraries in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if all(result.values()) else 1)
