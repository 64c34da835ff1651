"""The Triton LoRA shrink/expand (pagellm/ops/triton_lora.py) against the token-by-token torch reference.

Without a GPU the kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 is read when
triton is first imported, so the cases run in one child process (this file as a script) and each
verdict comes back as JSON. With a GPU the same cases run in-process on CUDA.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()

# (request slots, query lens, slice sizes, rank, in features, dtype, slots): ragged against the 64-wide tiles
CASES = {
    "decode_mixed_fp32": ([0, -1, 2, 1, 0], [1, 1, 1, 1, 1], [40], 4, 96, "float32", 3),
    "prefill_mixed_qkv_fp32": ([1, -1, 0], [7, 3, 5], [48, 16, 16], 8, 80, "float32", 2),
    "merged_gate_up_fp16": ([0, 0, -1], [2, 1, 4], [70, 70], 16, 64, "float16", 2),
    "base_only_fp32": ([-1, -1], [2, 2], [24], 4, 32, "float32", 1),
}


def run_case(name: str, device: str) -> str | None:
    from pagellm.lora.ops import add_lora_reference
    from pagellm.ops.triton_lora import add_lora_triton

    req_slots, qlens, sizes, rank, d_in, dtype, num_slots = CASES[name]
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(len(name))
    a = torch.randn(num_slots, len(sizes) * rank, d_in, generator=gen) * 0.2
    bs = [torch.randn(num_slots, rank, s, generator=gen) * 0.2 for s in sizes]
    b_full = torch.zeros(num_slots, len(sizes) * rank, sum(sizes))
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    for j, (b, off, s) in enumerate(zip(bs, offsets, sizes)):
        b_full[:, j * rank:(j + 1) * rank, off:off + s] = b
    slots = torch.repeat_interleave(torch.tensor(req_slots), torch.tensor(qlens))
    x = torch.randn(int(slots.shape[0]), d_in, generator=gen)
    base = torch.randn(x.shape[0], sum(sizes), generator=gen)
    want = add_lora_reference(base.clone(), x.to(dt).float(), a.to(dt).float(), b_full.to(dt).float(), slots)
    got = add_lora_triton(base.to(dt).to(device), x.to(dt).to(device), a.to(dt).to(device),
                          [b.to(dt).to(device) for b in bs], [(str(j), o, s) for j, (o, s) in
                                                               enumerate(zip(offsets, sizes))], slots.to(device))
    tol = 2e-5 if dtype == "float32" else 4e-3
    try:
        torch.testing.assert_close(got.float().cpu(), want, atol=tol * 10, rtol=tol * 10)
    except AssertionError as exc:
        return str(exc)[:1000]
    return None


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if HAS_CUDA:
        return {}
    pytest.importorskip("triton")
    from conftest import early_subprocess_result

    returncode, stdout, stderr = early_subprocess_result(os.path.basename(__file__), timeout=300)
    assert returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_lora_matches_reference(name, interpreter_results):
    error = run_case(name, "cuda") if HAS_CUDA else interpreter_results[name]
    assert error is None, error


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    print(json.dumps({name: run_case(name, "cpu") for name in CASES}))
