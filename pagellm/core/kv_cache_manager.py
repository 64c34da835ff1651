"""Maps requests to KV blocks: allocation for N new tokens, prefix-cache lookups, freeing.

Token `t` of a request lives in block `blocks[t // block_size]`, slot `t % block_size`.

Prefix caching: block i of a request is known by the hash of (block i-1's hash, its
token ids, extra keys); the first block chains on a seeded root hash and carries the
request's `cache_salt` and LoRA adapter id, so requests with different salts or adapters never
share a block. A block is
registered under its hash when the step that computes its last token is scheduled: every
layer writes the step's K/V before any attention reads the cache, so a request admitted
later in the same step may already read it. Registered blocks stay findable after their
request frees them, until the pool reuses them (LRU).
"""

from __future__ import annotations

from typing import Optional

from pagellm.core.block_pool import DEFAULT_HASH_SEED, BlockHash, BlockPool, hash_block_tokens, root_block_hash
from pagellm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_seed: str = DEFAULT_HASH_SEED) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = root_block_hash(hash_seed)
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
    @staticmethod
    def extra_keys(request: Request, block_index: int) -> tuple:
        """What besides token ids decides a block's KV. Only the first block needs the request-wide
        keys: every later hash chains on it."""
        if block_index != 0:
            return ()
        keys: tuple = ()
        if request.cache_salt is not None:
            keys = ("salt", request.cache_salt)
        if request.lora_request is not None:  # KV computed under an adapter serves only that adapter
            keys += ("lora", request.lora_request.lora_int_id)
        return keys

    def _hash_blocks(self, request: Request, num_tokens: int) -> list[BlockHash]:
        """Makes sure the request's full blocks among its first `num_tokens` tokens are hashed.

        Memoised on the request (token ids never change once written), so each block is
        hashed once however often the request is looked up or grows. Returns the request's
        whole hash list, which may be longer than asked for.
        """
        hashes = request.block_hashes
        num_full = num_tokens // self.block_size
        if len(hashes) < num_full:
            bs = self.block_size
            prompt, output = request.prompt_token_ids, request.output_token_ids
            parent = hashes[-1] if hashes else self.root_hash
            for i in range(len(hashes), num_full):
                start, end = i * bs, (i + 1) * bs
                if end <= len(prompt):
                    tokens = prompt[start:end]
                else:
                    tokens = (prompt[start:] if start < len(prompt) else []) + \
                        output[max(start - len(prompt), 0):end - len(prompt)]
                parent = hash_block_tokens(parent, tokens, self.extra_keys(request, i))
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, request: Request, use_cache: Optional[bool] = None) -> tuple[list[int], int]:
        """Longest run of leading blocks already in the cache, and how many tokens they cover.

        At least one token is always left to compute, so the step still produces logits.
        Requests asking for prompt logprobs bypass the cache: logprobs come from the logits
        of computed positions, and cached positions would have none.
        """
        if not (self.enable_prefix_caching if use_cache is None else use_cache):
            return [], 0
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hash_blocks(request, max_blocks * self.block_size)
        hits: list[int] = []
        lookup = self.pool.lookup
        for i in range(max_blocks):
            block_id = lookup(hashes[i])
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
        if request.num_computed_tokens == 0 and not blocks and self._looked_up(request):
            # Once per admission (a blocked request retrying never gets here).
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * self.block_size
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(needed) if needed > 0 else []
        blocks.extend(new_blocks)
        if cache_blocks:
            # Blocks become findable as soon as the step that fills them is scheduled: KV is
            # written before attention reads it within a forward pass, so a request admitted
            # in the same step may already reuse them. (Also with caching off: parallel-sampling
            # siblings look them up; hashing costs ~3 us per block, nothing next to computing it.)
            # Only tokens the request holds: speculative proposals scheduled after them get slots
            # but no hashes until they are accepted (their KV may be rolled back).
            self._cache_full_blocks(request, min(num_computed + num_new_tokens, request.num_tokens))
        return new_blocks

    def _looked_up(self, request: Request) -> bool:
        """Whether admission consulted the cache for this request (what the hit-rate counters count)."""
        use_cache = self.enable_prefix_caching or request.share_prefix
        return use_cache and request.sampling_params.prompt_logprobs is None

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        start = self._num_cached_blocks.get(request.request_id, 0)
        num_full = num_tokens // self.block_size
        if num_full <= start:
            return  # the common decode step: no block filled up
        hashes = self._hash_blocks(request, num_tokens)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def forget_uncomputed_blocks(self, request: Request) -> None:
        """Unregisters the request's cached blocks past its computed tokens: registered when a step
        that then failed was scheduled, their KV may never have been written."""
        confirmed = request.num_computed_tokens // self.block_size
        registered = self._num_cached_blocks.get(request.request_id, 0)
        if registered <= confirmed:
            return
        blocks = self.req_to_blocks[request.request_id]
        for i in range(confirmed, registered):
            self.pool.forget_hash(blocks[i])
        self._num_cached_blocks[request.request_id] = confirmed

    def free_blocks_after(self, request: Request, num_tokens: int) -> None:
        """Frees the request's blocks past the first `num_tokens` tokens (the slots of rejected
        speculative proposals; never hashed, so they go back as plain free blocks)."""
        blocks = self.req_to_blocks.get(request.request_id)
        if not blocks:
            return
        keep = cdiv(num_tokens, self.block_size)
        if len(blocks) <= keep:
            return
        surplus = blocks[keep:]
        del blocks[keep:]
        self.pool.free(reversed(surplus))

    def free(self, request: Request) -> None:
        """Drops the request's hold on its blocks, last block first: the free list is the eviction
        order, and a request's tail (its own suffix) is less likely to be shared than its head."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        """Forgets all cached blocks; refused (False) while any request holds blocks."""
        return self.pool.reset_prefix_cache()
