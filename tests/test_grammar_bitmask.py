"""The step's grammar bitmask: applied in place to the constrained rows only (against the shift-unpack
reference), filled in the background, and sent across a process boundary as a plain tensor."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pagellm.structured_output.backend import bitmask_to_bool, bitmask_words
from pagellm.structured_output.bitmask import PendingBitmask, apply_bitmask_, fill_in_background, resolve_bitmask


def _random_bitmask(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Mixed words: all-allowed, all-banned, sparse and random ones (the shapes real grammars give)."""
    words = bitmask_words(vocab)
    random = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=gen, dtype=torch.int64).to(torch.int32)
    kind = torch.randint(0, 4, (rows, words), generator=gen)
    sparse = torch.tensor(1 << 5, dtype=torch.int32)
    return torch.where(kind == 0, -1, torch.where(kind == 1, 0, torch.where(kind == 2, sparse, random))).to(torch.int32)


@pytest.mark.parametrize("vocab,width", [(100, 100), (100, 128), (96, 96), (1000, 1003), (49152, 49152)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_matches_the_unpacked_reference(vocab, width, dtype):
    gen = torch.Generator().manual_seed(vocab + width)
    num_logit_rows, bitmask = 7, _random_bitmask(4, vocab, gen)
    logits = torch.randn(num_logit_rows, width, generator=gen).to(dtype)
    logit_rows, bitmask_rows = [5, 0, 3], [2, 0, 3]  # out of order; logits rows 1, 2, 4, 6 are free
    out = logits.clone()
    apply_bitmask_(out, bitmask, logit_rows, bitmask_rows, vocab)

    expected = logits.clone()
    allowed = bitmask_to_bool(bitmask, vocab)
    for j, r in zip(logit_rows, bitmask_rows):
        row = torch.full((width,), False)
        row[:vocab] = allowed[r]
        expected[j] = expected[j].masked_fill(~row, float("-inf"))
    assert torch.equal(out, expected)
    assert torch.equal(out[[1, 2, 4, 6]], logits[[1, 2, 4, 6]])


def test_apply_bitmask_bans_the_padding_past_the_vocabulary():
    logits = torch.zeros(2, 70)
    apply_bitmask_(logits, torch.full((1, bitmask_words(64)), -1, dtype=torch.int32), [1], [0], 64)
    assert torch.isinf(logits[1, 64:]).all() and (logits[1, :64] == 0).all() and (logits[0] == 0).all()


def test_apply_bitmask_checks_its_rows():
    with pytest.raises(ValueError, match="rows"):
        apply_bitmask_(torch.zeros(2, 32), torch.zeros(1, 1, dtype=torch.int32), [0, 1], [0], 32)
    logits = torch.zeros(2, 32)
    apply_bitmask_(logits, torch.zeros(0, 1, dtype=torch.int32), [], [], 32)  # nothing constrained
    assert (logits == 0).all()


def test_the_fill_runs_in_the_background_and_pickles_as_its_tensor():
    release = threading.Event()
    mask = torch.tensor([[0x0F]], dtype=torch.int32)

    def fill():
        release.wait(5)
        return mask

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = fill_in_background(pool, fill)
        assert isinstance(pending, PendingBitmask) and not pending.done()  # the caller goes on meanwhile
        release.set()
        assert torch.equal(resolve_bitmask(pending), mask)
        assert torch.equal(pickle.loads(pickle.dumps(pending)), mask)  # multiprocess executors get the tensor
    assert resolve_bitmask(None) is None and resolve_bitmask(mask) is mask
