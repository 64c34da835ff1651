"""The draft model's own block table: which tokens' KV it holds per request, in which blocks.

Pure Python over a `BlockPool` (no prefix caching: a draft's KV is cheap to recompute and lives
only as long as its request). Token `t` of a request sits in `blocks[t // block_size]`, slot
`t % block_size`, the same geometry as the target's cache. Each propose call first rolls a
request back to the longest common prefix of what the draft holds and the request's new
history (rejected proposals and preemption both shorten it), then reserves room for what it
will compute; a reservation the pool cannot supply changes nothing and returns False.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pagellm.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if not (isinstance(a, list) and isinstance(b, list)):
        a, b = list(a[:n]), list(b[:n])
    if a[:n] == b[:n]:  # the usual case: one extends the other (a C-speed list compare)
        return n
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0])


class DraftBlockTable:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.tokens: dict[str, list[int]] = {}  # tokens whose KV is in the cache, in order
        self.blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_held(self, req_id: str) -> int:
        return len(self.tokens.get(req_id, ()))

    def rollback(self, req_id: str, history: Sequence[int]) -> int:
        """Keeps the held tokens that match `history`, but at most len(history) - 1 of them (the
        last history token is always fed again: its logits give the first proposal). Frees the
        blocks past what is kept; returns how many tokens are kept."""
        tokens = self.tokens.setdefault(req_id, [])
        blocks = self.blocks.setdefault(req_id, [])
        keep = min(common_prefix_len(tokens, history), max(len(history) - 1, 0))
        del tokens[keep:]
        self._shrink(blocks, keep)
        return keep

    def reserve(self, req_id: str, num_tokens: int) -> bool:
        """Blocks for the request's first `num_tokens` tokens; False (nothing allocated) when the
        pool is short."""
        blocks = self.blocks.setdefault(req_id, [])
        self.tokens.setdefault(req_id, [])
        needed = cdiv(num_tokens, self.block_size) - len(blocks)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        blocks.extend(self.pool.allocate(needed))
        return True

    def release_unused(self, req_id: str) -> None:
        """Frees the request's blocks past its held tokens (a reservation that went unused)."""
        self._shrink(self.blocks.get(req_id, []), self.num_held(req_id))

    def append(self, req_id: str, token_ids: Sequence[int]) -> None:
        """Records that the KV of `token_ids` (following the held ones) has been written."""
        tokens = self.tokens[req_id]
        tokens.extend(token_ids)
        assert len(tokens) <= len(self.blocks[req_id]) * self.block_size, "KV written past the reserved blocks"

    def free(self, req_id: str) -> None:
        self.tokens.pop(req_id, None)
        self.pool.free(reversed(self.blocks.pop(req_id, [])))

    def _shrink(self, blocks: list[int], num_tokens: int) -> None:
        keep_blocks = cdiv(num_tokens, self.block_size)
        if len(blocks) > keep_blocks:
            self.pool.free(reversed(blocks[keep_blocks:]))
            del blocks[keep_blocks:]
