"""The pool of fixed-size KV blocks: ref counts, a free list, and the prefix-cache map.

A block is free when no request holds it (ref_cnt == 0). A free block may still
carry the hash of the tokens whose KV it holds; it stays findable by that hash
until the pool needs room and reuses it. The free list is kept in eviction order:
blocks without a hash (nothing worth keeping) at the front, then cached blocks least
recently freed first, so reuse evicts least-recently-used cached blocks, and only
when no uncached block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable, Optional, Sequence, Union

BlockHash = bytes
# An extra key that changes what a block means beyond its token ids: a cache salt, a LoRA id, ...
ExtraKey = Union[str, int]

DEFAULT_HASH_SEED = "pagellm-prefix-cache-v1"


def root_block_hash(seed: str = DEFAULT_HASH_SEED) -> BlockHash:
    """The parent of every request's first block. A different seed gives a disjoint hash space."""
    return hashlib.blake2b(seed.encode(), digest_size=16, person=b"pagellm-root").digest()


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int], extra_keys: tuple[ExtraKey, ...] = ()) -> BlockHash:
    """Chains the parent block's hash with this block's token ids and extra keys.

    The hash stands for the block's KV, which depends on every earlier token: hence the
    chain. A cryptographic digest keeps collisions (which would silently reuse wrong KV)
    out of the picture. Extra keys are typed and length-prefixed, so no two different key
    tuples encode to the same bytes.
    """
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        data = f"{type(key).__name__}:{key}".encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[BlockHash] = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> None, ordered: the front is evicted / reused first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    # -- queries ----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> Optional[int]:
        return self._cached.get(block_hash)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    # -- allocation -------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Takes n blocks off the front of the free list, evicting their cached hashes."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks but only {len(self._free)} are free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Adds a reference to blocks found through the prefix cache."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drops one reference from each block; cached blocks reaching zero go to the back of the
        free list, uncached ones to the front (reusing them first loses no cached prefix).

        Callers pass a request's blocks tail first, so a request's last blocks (least likely
        to be shared) are evicted before its first ones.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    # -- prefix cache -----------------------------------------------------------
    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Registers a full block under its hash. An identical block already cached keeps the entry."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # same content computed twice (e.g. in one step); the first copy stays the canonical one
        block.block_hash = block_hash
        self._cached[block_hash] = block_id

    def forget_hash(self, block_id: int) -> None:
        """Makes one block unfindable (its contents are not to be trusted)."""
        self._evict(self.blocks[block_id])

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash, but only when no request holds a block; returns whether it did.

        A held block's KV may be read again by its request, and a block a request is still
        filling would be re-registered later; refusing while anything is held (as vLLM does)
        keeps "after a reset nothing old is findable" true without touching running requests.
        """
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (held or free)."""
        return len(self._cached)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block.block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
