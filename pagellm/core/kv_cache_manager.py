"""Maps requests to KV blocks: allocation for N new tokens, prefix-cache lookups, freeing.

Token `t` of a request lives in block `blocks[t // block_size]`, slot `t % block_size`.
"""

from __future__ import annotations

from typing import Optional

from pagellm.core.block_pool import BlockHash, BlockPool, hash_block_tokens
from pagellm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[int]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # In tokens, counted once per admitted request (not per retry of a blocked one).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return self.req_to_blocks.get(request_id, [])

    # -- prefix cache -----------------------------------------------------------
    def _block_hashes(self, request: Request, num_tokens: int) -> list[BlockHash]:
        """Hashes of the request's full blocks among its first `num_tokens` tokens (memoised on the request)."""
        hashes = request.block_hashes
        num_full = num_tokens // self.block_size
        if len(hashes) < num_full:
            tokens = request.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), num_full):
                parent = hashes[i - 1] if i else None
                hashes.append(hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt))
        return hashes[:num_full]

    def get_computed_blocks(self, request: Request, use_cache: Optional[bool] = None) -> tuple[list[int], int]:
        """Longest run of leading blocks already in the cache, and how many tokens they cover.

        At least one token is always left to compute, so the step still produces logits.
        """
        if not (self.enable_prefix_caching if use_cache is None else use_cache):
            return [], 0
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0  # cached tokens would get no prompt logprobs: compute them all
        max_tokens = request.num_tokens - 1
        hits: list[int] = []
        for block_hash in self._block_hashes(request, max_tokens):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    # -- allocation -------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: Optional[list[int]] = None,
        cache_blocks: bool = True,
    ) -> Optional[list[int]]:
        """Makes room for `num_new_tokens` more tokens after the request's computed ones.

        `computed_blocks` are prefix-cache hits for a request being admitted. Returns the
        newly allocated block ids (possibly empty), or None when the pool cannot supply them;
        in that case nothing changes.
        """
        computed_blocks = computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(computed_blocks)
        # Hits that currently sit on the free list stop being allocatable once we take them.
        num_hits_on_free_list = sum(1 for b in computed_blocks if self.pool.is_free(b))
        if max(needed, 0) > self.pool.num_free_blocks - num_hits_on_free_list:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        if request.num_computed_tokens == 0 and not blocks:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(needed) if needed > 0 else []
        blocks.extend(new_blocks)
        if cache_blocks:
            # Blocks become findable as soon as the step that fills them is scheduled: KV is
            # written before attention reads it within a forward pass, so a request admitted
            # in the same step may already reuse them.
            self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        start = self._num_cached_blocks.get(request.request_id, 0)
        hashes = self._block_hashes(request, num_tokens)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, len(hashes)):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = max(start, len(hashes))

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
