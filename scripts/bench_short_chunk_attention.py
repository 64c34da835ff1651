"""Short prompt chunks (speculative verification's 1 + k tokens) on the CPU backend: the decode
kernel one row per query token against the SDPA path that copies the context out of the pool.

    python scripts/bench_short_chunk_attention.py

One attention layer of SmolLM2's shape (9 query / 3 KV heads of 64, fp32, block size 16), random
paged caches; min over alternating rounds of 20 calls. The ratio chose `SHORT_QUERY_ROWS`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagellm.attention.cpu_backend import CpuAttentionBackend  # noqa: E402
from pagellm.ops.cpu import load_cpu_ops  # noqa: E402
from tests.test_cpu_kernels import _paged_batch  # noqa: E402


def time_forward(backend: CpuAttentionBackend, batch, calls: int = 20) -> float:
    q, k, v, cache, md = batch
    for _ in range(3):
        backend.forward(q, k, v, cache, md, 0.125)
    start = time.perf_counter()
    for _ in range(calls):
        backend.forward(q, k, v, cache, md, 0.125)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    if not load_cpu_ops():
        raise SystemExit("the C++ CPU kernels did not build")
    for context in (400, 4000):
        for query_len in (5, 9, 16):
            for batch_size in (1, 8):
                batch = _paged_batch(torch.Generator().manual_seed(0), [query_len] * batch_size,
                                     [context] * batch_size, 16, 9, 3, 64, torch.float32)
                sdpa, rows = [], []
                for _ in range(2):
                    sdpa.append(time_forward(CpuAttentionBackend(short_query_rows=0), batch))
                    rows.append(time_forward(CpuAttentionBackend(short_query_rows=query_len), batch))
                print(f"context {context}, {query_len} query tokens, batch {batch_size}: SDPA {min(sdpa):.3f} ms, "
                      f"kernel rows {min(rows):.3f} ms, {min(sdpa) / min(rows):.2f}x")


if __name__ == "__main__":
    main()
