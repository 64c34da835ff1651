"""The torch backend's grouped decode path equals one whole-batch SDPA call and a per-request
reference, on a ragged batch with random block tables (GQA, sliding window, softcap)."""

from __future__ import annotations

import pytest
import torch

from pagellm.attention.backend import build_metadata
from pagellm.attention.torch_backend import TorchAttentionBackend


def _ragged_decode_batch(seed: int, block_size: int = 16, hq: int = 8, hkv: int = 2, d: int = 32):
    gen = torch.Generator().manual_seed(seed)
    context_lens = [5, 130, 47, 300, 16, 1]
    num_blocks = 64
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_ids, used = [], 0
    for c in context_lens:
        n = -(-(c + 1) // block_size)
        block_ids.append(order[used:used + n])
        used += n
    md = build_metadata([1] * len(context_lens), context_lens, block_ids, block_size, torch.device("cpu"))
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen)
    t = len(context_lens)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
    return q, k, v, cache, md


@pytest.mark.parametrize("window,softcap", [(None, None), (40, None), (None, 30.0)])
def test_grouped_decode_equals_whole_batch_and_per_request(window, softcap):
    q, k, v, cache, md = _ragged_decode_batch(0)
    outs = {}
    for group_bytes in (1, 400_000, 1 << 40):  # one request per group, two per group, the whole batch
        outs[group_bytes] = TorchAttentionBackend(decode_group_bytes=group_bytes).forward(
            q, k, v, cache.clone(), md, 0.2, window, softcap)
    torch.testing.assert_close(outs[400_000], outs[1 << 40], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[1 << 40], atol=1e-5, rtol=1e-5)
    # Independent reference: plain softmax attention over each request's keys, read by block table.
    written = cache.clone()
    TorchAttentionBackend().forward(q, k, v, written, md, 0.2, window, softcap)
    for i, seq_len in enumerate(md.seq_lens):
        blocks = md.block_tables[i, : -(-seq_len // 16)].long()
        keys = written[0][blocks].flatten(0, 1)[:seq_len].repeat_interleave(4, dim=1)  # [L, Hq, D]
        values = written[1][blocks].flatten(0, 1)[:seq_len].repeat_interleave(4, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i], keys) * 0.2
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if window is not None:
            scores[:, : max(0, seq_len - window)] = float("-inf")
        expected = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
        torch.testing.assert_close(outs[400_000][i], expected, atol=1e-5, rtol=1e-5)
