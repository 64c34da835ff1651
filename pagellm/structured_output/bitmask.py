"""The step's grammar bitmask: filled off the main thread while the forward runs, applied to the logits.

    fill_in_background(pool, fill)   a `PendingBitmask`: the fill runs on the pool's thread
    resolve_bitmask(mask)            the tensor (waits for a pending fill)
    apply_bitmask_(logits, ...)      -inf on every token a constrained row's grammar forbids, in place

The engine core starts the fill just before it hands the step to the executor, so the grammar
work (xgrammar's fill releases the GIL) overlaps input preparation and the forward pass; the
runner waits for it only after the logits are computed. A `PendingBitmask` that must leave the
process (multiprocess or Ray executors pickle the step) waits for its fill and travels as the
plain tensor, so remote workers see the same data and lose only the overlap.

Applying: the packed int32 words of the constrained rows are read as bytes and unpacked with a
256-entry table of additive masks (0 or -inf per bit), one gather and one `index_add_` for the
whole batch, on the logits' device. Measured on this project's 2-core CPU (40 rows, vocabulary
49,152, one thread): ~3.3 ms, whatever the mask looks like, against 3.5-11 ms for a shift-and-
masked_fill unpack (masked_fill slows down on irregular masks) and 5-9 ms for xgrammar's CPU
`apply_token_bitmask_inplace` (slowest on sparse masks, the common case).
"""

from __future__ import annotations

import functools
import sys
from concurrent.futures import Executor, Future
from typing import Callable, Optional, Union

import torch

_NEG_INF = float("-inf")


class PendingBitmask:
    """A bitmask being filled on another thread; `result()` waits for it."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def result(self) -> torch.Tensor:
        return self._future.result()

    def done(self) -> bool:
        return self._future.done()

    def __reduce__(self):
        # Crossing a process boundary: send the finished tensor (the fill is done by then).
        return _identity, (self.result(),)


def _identity(value):
    return value


def fill_in_background(pool: Executor, fill: Callable[[], torch.Tensor]) -> PendingBitmask:
    return PendingBitmask(pool.submit(fill))


def resolve_bitmask(mask: Union[torch.Tensor, PendingBitmask, None]) -> Optional[torch.Tensor]:
    return mask.result() if isinstance(mask, PendingBitmask) else mask


@functools.cache
def _additive_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: entry [b, k] is 0 where bit k of byte b is set (allowed), else -inf. Read-only."""
    bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, _NEG_INF).to(device=device, dtype=dtype)


def _unpack_additive(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, W] int32 -> [R, 32 W] of 0 / -inf (token i allowed: bit i % 32 of word i // 32)."""
    if sys.byteorder == "little":
        # Byte k of a word holds its bits 8k..8k+7, so bytes in memory order are tokens in order.
        table = _additive_table(words.device, dtype)
        return table[words.contiguous().view(torch.uint8).int()].view(words.shape[0], -1)
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=words.device)) & 1
    return torch.where(bits.bool(), 0.0, _NEG_INF).to(dtype).flatten(1)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, logit_rows: list[int], bitmask_rows: list[int],
                   vocab_size: int) -> None:
    """Sets `logits[logit_rows[i], t]` to -inf for every token t that `bitmask[bitmask_rows[i]]` does not
    allow, in place; columns at or past `vocab_size` (padding) are banned for those rows too. Other
    rows are untouched."""
    if len(logit_rows) != len(bitmask_rows):
        raise ValueError(f"apply_bitmask_: {len(logit_rows)} logits rows for {len(bitmask_rows)} bitmask rows")
    if not logit_rows:
        return
    device = logits.device
    words = bitmask.to(device, non_blocking=True)
    if bitmask_rows != list(range(words.shape[0])):
        words = words[torch.tensor(bitmask_rows, device=device)]
    add = _unpack_additive(words, logits.dtype)
    width = logits.shape[1]
    if add.shape[1] < width:
        add = torch.cat([add, add.new_full((add.shape[0], width - add.shape[1]), _NEG_INF)], dim=1)
    add = add[:, :width]
    if vocab_size < width:
        add[:, vocab_size:] = _NEG_INF
    logits.index_add_(0, torch.tensor(logit_rows, device=device), add)
