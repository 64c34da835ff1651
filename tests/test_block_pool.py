"""BlockPool and KVCacheManager, driven directly: no model, no tensors."""

from __future__ import annotations

import pytest

from pagellm.core.block_pool import BlockPool, hash_block_tokens, root_block_hash
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams


ROOT = root_block_hash()


def free_order(pool: BlockPool) -> list[int]:
    """The free list, front (reused first) to back."""
    return list(pool._free)


def snapshot(kv: KVCacheManager) -> tuple:
    """Everything allocate_slots may change, to check a refused call changed nothing."""
    pool = kv.pool
    return (
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        free_order(pool),
        dict(pool._cached),
        {k: list(v) for k, v in kv.req_to_blocks.items()},
        dict(kv._num_cached_blocks),
    )


def make_req(req_id: str, tokens: list[int], **params) -> Request:
    salt = params.pop("cache_salt", None)
    return Request(req_id, tokens, SamplingParams(**params), cache_salt=salt)


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.req_to_blocks == {}
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


# -- hashing -----------------------------------------------------------------------


def test_block_hash_chains_parent_tokens_and_extra_keys():
    h0 = hash_block_tokens(ROOT, [1, 2, 3, 4])
    assert isinstance(h0, bytes) and len(h0) == 16
    assert h0 == hash_block_tokens(ROOT, [1, 2, 3, 4])
    assert h0 != hash_block_tokens(ROOT, [1, 2, 3, 5])
    assert h0 != hash_block_tokens(ROOT, [4, 3, 2, 1])
    assert hash_block_tokens(h0, [5, 6]) != hash_block_tokens(ROOT, [5, 6])
    assert hash_block_tokens(h0, [5, 6]) != hash_block_tokens(hash_block_tokens(ROOT, [9]), [5, 6])
    # Extra keys (a salt, a LoRA id) change the hash; type and boundaries count.
    assert hash_block_tokens(ROOT, [1, 2], ("salt", "a")) != hash_block_tokens(ROOT, [1, 2])
    assert hash_block_tokens(ROOT, [1, 2], ("salt", "a")) != hash_block_tokens(ROOT, [1, 2], ("salt", "b"))
    assert hash_block_tokens(ROOT, [1, 2], ("ab", "c")) != hash_block_tokens(ROOT, [1, 2], ("a", "bc"))
    assert hash_block_tokens(ROOT, [1, 2], (7,)) != hash_block_tokens(ROOT, [1, 2], ("7",))
    # Large token ids are hashed exactly (no truncation to 32 bits).
    assert hash_block_tokens(ROOT, [2**40]) != hash_block_tokens(ROOT, [0])


def test_root_hash_is_seeded():
    assert root_block_hash() == root_block_hash()  # deterministic across runs and processes
    assert root_block_hash("deployment-a") != root_block_hash("deployment-b")
    assert root_block_hash("deployment-a") != root_block_hash()
    # Managers seeded differently hash the same prompt differently.
    prompt = list(range(1, 10))
    a = KVCacheManager(8, 4, hash_seed="deployment-a")
    b = KVCacheManager(8, 4, hash_seed="deployment-b")
    ra, rb = make_req("a", prompt), make_req("b", prompt)
    a.allocate_slots(ra, 9)
    b.allocate_slots(rb, 9)
    assert len(ra.block_hashes) == 2 and set(ra.block_hashes).isdisjoint(rb.block_hashes)


def test_request_block_hashes_match_the_chain_over_prompt_and_output():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_req("r", [10, 11, 12, 13, 14, 15], cache_salt="t1")
    kv.allocate_slots(req, 6)
    assert len(req.block_hashes) == 1  # only full blocks are hashed
    req.num_computed_tokens = 6
    req.output_token_ids.extend([16, 17, 18, 19, 20])
    kv.allocate_slots(req, 5)  # tokens 6..10: block 1 (prompt + output tokens) fills up
    h0 = hash_block_tokens(ROOT, [10, 11, 12, 13], ("salt", "t1"))
    h1 = hash_block_tokens(h0, [14, 15, 16, 17])  # the salt rides along the chain
    assert req.block_hashes == [h0, h1]
    blocks = kv.get_block_ids("r")
    assert kv.pool.lookup(h0) == blocks[0] and kv.pool.lookup(h1) == blocks[1]
    assert kv.pool.blocks[blocks[2]].block_hash is None  # partial block: not registered


# -- block pool ---------------------------------------------------------------------


def test_pool_rejects_empty():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_allocate_free_and_ref_counts():
    pool = BlockPool(6)
    assert pool.num_free_blocks == 6 and pool.usage == 0.0
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert a == [0, 1] and b == [2, 3, 4]
    assert [pool.blocks[i].ref_cnt for i in a + b] == [1] * 5
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(5 / 6)
    with pytest.raises(RuntimeError, match="only 1 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # a refused allocation takes nothing

    pool.touch([0])  # a second holder
    assert pool.blocks[0].ref_cnt == 2
    pool.free([0])
    assert pool.blocks[0].ref_cnt == 1 and not pool.is_free(0)
    pool.free(reversed(a))
    assert pool.is_free(0) and pool.is_free(1) and pool.blocks[0].ref_cnt == 0
    pool.free(reversed(b))
    assert pool.num_free_blocks == 6 and pool.usage == 0.0


def test_double_free_raises():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([2])  # never allocated
    assert pool.num_free_blocks == 3


def test_free_list_is_lru_and_freed_blocks_go_to_the_back():
    pool = BlockPool(6)
    req_a = pool.allocate(3)  # 0, 1, 2
    req_b = pool.allocate(2)  # 3, 4
    for i in req_a + req_b:
        pool.cache_block(i, hash_block_tokens(ROOT, [i]))
    assert free_order(pool) == [5]
    # Tail first, as the KV cache manager frees a request: its last block is evicted first.
    pool.free(reversed(req_a))
    assert free_order(pool) == [5, 2, 1, 0]
    pool.free(reversed(req_b))
    assert free_order(pool) == [5, 2, 1, 0, 4, 3]
    assert pool.allocate(3) == [5, 2, 1]
    # Reused blocks lose their hash; the others stay findable.
    assert pool.lookup(hash_block_tokens(ROOT, [2])) is None
    assert pool.blocks[2].block_hash is None
    assert pool.lookup(hash_block_tokens(ROOT, [0])) == 0


def test_cached_free_blocks_are_reused_after_uncached_ones():
    pool = BlockPool(8)
    cached = pool.allocate(3)  # 0, 1, 2: full blocks with hashes
    plain = pool.allocate(3)  # 3, 4, 5: e.g. partial tail blocks, no hash
    for i in cached:
        pool.cache_block(i, hash_block_tokens(ROOT, [i]))
    pool.free(reversed(cached))
    pool.free(reversed(plain))  # freed later, but holds nothing worth keeping
    got = pool.allocate(5)
    assert sorted(got) == [3, 4, 5, 6, 7]
    for i in cached:
        assert pool.lookup(hash_block_tokens(ROOT, [i])) == i
    # Only now is a cached block evicted: the least recently freed one (2 was freed first).
    assert pool.allocate(1) == [2]
    assert pool.lookup(hash_block_tokens(ROOT, [2])) is None
    assert pool.blocks[2].block_hash is None and pool.blocks[2].ref_cnt == 1
    assert pool.lookup(hash_block_tokens(ROOT, [1])) == 1


def test_cache_block_and_lookup():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    h = hash_block_tokens(ROOT, [7, 7])
    assert pool.lookup(h) is None
    pool.cache_block(a, h)
    assert pool.lookup(h) == a and pool.blocks[a].block_hash == h
    # The same content computed again elsewhere: the first copy stays canonical.
    pool.cache_block(b, h)
    assert pool.lookup(h) == a and pool.blocks[b].block_hash is None
    # A block keeps the first hash it was given.
    h2 = hash_block_tokens(ROOT, [8, 8])
    pool.cache_block(a, h2)
    assert pool.lookup(h2) is None and pool.blocks[a].block_hash == h
    # Freeing keeps the hash; reuse drops it.
    pool.free([b])
    assert pool.reset_prefix_cache() is False  # a is still held
    assert pool.lookup(h) == a
    pool.free([a])
    assert pool.lookup(h) == a
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(h) is None and pool.blocks[a].block_hash is None


def test_touch_of_free_cached_block_takes_it_off_the_free_list():
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    h = hash_block_tokens(ROOT, [1, 2])
    pool.cache_block(a, h)
    pool.free([a])
    assert pool.is_free(a) and pool.num_free_blocks == 4 and pool.usage == 0.0
    pool.touch([pool.lookup(h)])
    assert not pool.is_free(a) and pool.blocks[a].ref_cnt == 1
    assert pool.num_free_blocks == 3 and pool.usage == pytest.approx(0.25)
    # The remaining free blocks never hand it out.
    assert a not in pool.allocate(3)
    assert pool.lookup(h) == a  # still cached while held
    pool.touch([a])
    assert pool.blocks[a].ref_cnt == 2


# -- KV cache manager -----------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, expected_blocks", [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (12, 3), (13, 4)]
)
def test_allocate_slots_block_counts(num_tokens, expected_blocks):
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_req("r", list(range(100, 100 + num_tokens)))
    new = kv.allocate_slots(req, num_tokens)
    assert len(new) == expected_blocks
    assert kv.get_block_ids("r") == new
    assert kv.num_free_blocks == 8 - expected_blocks
    kv.free(req)
    assert_all_free(kv)


def test_allocate_slots_grows_across_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_req("r", list(range(50, 56)))  # 6 prompt tokens
    assert len(kv.allocate_slots(req, 3)) == 1  # tokens 0..2
    req.num_computed_tokens = 3
    assert len(kv.allocate_slots(req, 1)) == 0  # token 3 still fits in block 0
    req.num_computed_tokens = 4
    assert len(kv.allocate_slots(req, 2)) == 1  # tokens 4, 5 open block 1
    req.num_computed_tokens = 6
    req.output_token_ids.extend([1, 2, 3])
    assert len(kv.allocate_slots(req, 2)) == 0  # tokens 6, 7
    req.num_computed_tokens = 8
    assert len(kv.allocate_slots(req, 1)) == 1  # token 8 opens block 2
    assert len(kv.get_block_ids("r")) == 3
    assert kv.num_free_blocks == 5
    kv.free(req)
    assert_all_free(kv)


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(10)))
    assert len(kv.allocate_slots(a, 10)) == 3
    b = make_req("b", list(range(20, 29)))
    before = snapshot(kv)
    assert kv.allocate_slots(b, 9) is None  # needs 3 blocks, 1 free
    assert snapshot(kv) == before
    assert "b" not in kv.req_to_blocks
    # A running request that cannot grow keeps what it has.
    a.num_computed_tokens = 10
    a.output_token_ids.extend(range(30, 37))
    before = snapshot(kv)
    assert kv.allocate_slots(a, 7) is None  # 17 tokens need 5 blocks
    assert snapshot(kv) == before
    assert len(kv.allocate_slots(a, 6)) == 1  # 16 tokens: exactly 4 blocks
    assert kv.num_free_blocks == 0
    kv.free(a)
    assert_all_free(kv)


def test_prefix_hits_find_the_longest_chain_of_full_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks + 2
    a = make_req("a", prompt)
    kv.allocate_slots(a, 14)
    blocks_a = kv.get_block_ids("a")

    same = make_req("same", prompt)
    hits, n = kv.get_computed_blocks(same)
    assert hits == blocks_a[:3] and n == 12

    longer = make_req("longer", prompt + [99, 98, 97])
    hits, n = kv.get_computed_blocks(longer)
    assert hits == blocks_a[:3] and n == 12

    diverge_in_block_1 = make_req("d1", prompt[:5] + [0] + prompt[6:])
    assert kv.get_computed_blocks(diverge_in_block_1) == (blocks_a[:1], 4)

    diverge_in_block_0 = make_req("d0", [0] + prompt[1:])
    assert kv.get_computed_blocks(diverge_in_block_0) == ([], 0)  # later blocks chain on block 0

    short = make_req("short", prompt[:7])  # 1 full block + 3
    assert kv.get_computed_blocks(short) == (blocks_a[:1], 4)


def test_a_block_hits_only_after_the_same_parent():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    kv.allocate_slots(make_req("x", [1, 2, 7, 7, 3]), 5)  # blocks [1 2] [7 7]
    kv.allocate_slots(make_req("z", [5, 6, 3, 4, 3]), 5)  # blocks [5 6] [3 4]
    # [1 2] hits; [3 4] is cached, but after [5 6]: its KV depends on that context.
    y = make_req("y", [1, 2, 3, 4, 9])
    assert kv.get_computed_blocks(y) == (kv.get_block_ids("x")[:1], 2)


def test_prefix_hits_never_cover_the_whole_prompt():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 9))  # exactly 2 full blocks
    a = make_req("a", prompt)
    kv.allocate_slots(a, 8)
    b = make_req("b", prompt)
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and hits == kv.get_block_ids("a")[:1]  # the last token is left to compute
    one_block = make_req("c", prompt[:4])
    assert kv.get_computed_blocks(one_block) == ([], 0)


def test_cache_salt_separates_prefixes():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 11))
    kv.allocate_slots(make_req("a", prompt, cache_salt="tenant-1"), 10)
    assert kv.get_computed_blocks(make_req("b", prompt))[1] == 0
    assert kv.get_computed_blocks(make_req("c", prompt, cache_salt="tenant-2"))[1] == 0
    assert kv.get_computed_blocks(make_req("d", prompt, cache_salt="tenant-1"))[1] == 8


def test_hits_share_blocks_and_raise_ref_counts():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))  # 10 tokens
    a = make_req("a", prompt)
    kv.allocate_slots(a, 10)  # blocks are findable as soon as they are scheduled
    b = make_req("b", prompt + [42])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    new = kv.allocate_slots(b, 11 - n, hits)
    assert len(new) == 1
    blocks_a, blocks_b = kv.get_block_ids("a"), kv.get_block_ids("b")
    assert blocks_b[:2] == blocks_a[:2] and blocks_b[2] != blocks_a[2]
    assert [kv.pool.blocks[i].ref_cnt for i in blocks_b] == [2, 2, 1]
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in blocks_b] == [1, 1, 1]
    assert kv.num_free_blocks == 8 - 3
    kv.free(b)
    assert_all_free(kv)
    # Both requests' full blocks stay cached after they are freed.
    assert kv.get_computed_blocks(make_req("c", prompt + [42, 43]))[1] == 8


def test_free_cached_hits_count_against_the_free_pool():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(1, 10))  # 9 tokens: 2 full blocks cached
    a = make_req("a", prompt)
    kv.allocate_slots(a, 9)
    kv.free(a)
    assert_all_free(kv)
    # 2 hits (on the free list) + 3 new blocks > 4: refused, and the hits stay free and cached.
    b = make_req("b", prompt + list(range(100, 110)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    before = snapshot(kv)
    assert kv.allocate_slots(b, 19 - n, hits) is None
    assert snapshot(kv) == before
    # 2 hits + 2 new blocks fit exactly.
    c = make_req("c", prompt + list(range(100, 107)))
    hits, n = kv.get_computed_blocks(c)
    assert len(kv.allocate_slots(c, 16 - n, hits)) == 2
    assert kv.get_block_ids("c")[:2] == hits
    assert kv.num_free_blocks == 0
    kv.free(c)
    assert_all_free(kv)


def test_free_evicts_a_requests_tail_before_its_head():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_req("a", list(range(1, 13)))  # 3 full blocks
    kv.allocate_slots(a, 12)
    blocks = kv.get_block_ids("a")
    kv.free(a)
    assert free_order(kv.pool) == [3] + blocks[::-1]


def test_prompt_logprobs_requests_do_not_use_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    kv.allocate_slots(make_req("a", prompt), 10)
    assert kv.get_computed_blocks(make_req("b", prompt, prompt_logprobs=0)) == ([], 0)
    assert kv.get_computed_blocks(make_req("c", prompt, prompt_logprobs=3), use_cache=True) == ([], 0)
    assert kv.get_computed_blocks(make_req("d", prompt))[1] == 8


def test_use_cache_flag_and_disabled_prefix_caching():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    kv.allocate_slots(make_req("a", prompt), 10)
    assert kv.get_computed_blocks(make_req("b", prompt), use_cache=False) == ([], 0)

    off = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    off.allocate_slots(make_req("a", prompt), 10)
    assert off.get_computed_blocks(make_req("b", prompt)) == ([], 0)
    # Parallel-sampling siblings ask explicitly and still share their prompt.
    assert off.get_computed_blocks(make_req("c", prompt), use_cache=True)[1] == 8


def test_prefix_cache_stats_and_reset():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))
    kv.get_computed_blocks(make_req("a", prompt))
    kv.allocate_slots(make_req("a", prompt), 10)
    b = make_req("b", prompt)
    hits, n = kv.get_computed_blocks(b)
    kv.get_computed_blocks(b)  # a blocked request retrying is not counted again
    assert kv.prefix_cache_queries == 10 and kv.prefix_cache_hits == 0  # counted on admission only
    kv.allocate_slots(b, 10 - n, hits)
    assert kv.prefix_cache_queries == 20 and kv.prefix_cache_hits == 8
    # Refused while requests hold blocks: nothing changes.
    assert kv.reset_prefix_cache() is False
    assert kv.get_computed_blocks(make_req("c", prompt))[1] == 8
    kv.free(make_req("a", prompt))
    kv.free(b)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_req("c", prompt)) == ([], 0)
    assert kv.pool.num_cached_blocks == 0 and all(blk.block_hash is None for blk in kv.pool.blocks)
    assert_all_free(kv)


def test_free_returns_everything_with_many_requests():
    kv = KVCacheManager(num_blocks=12, block_size=2)
    reqs = []
    for i in range(4):
        r = make_req(f"r{i}", [1, 2, 3, 4] + [i] * 3)  # shared 2-block prefix, then unique tokens
        hits, n = kv.get_computed_blocks(r)
        assert n == (0 if i == 0 else 4)
        assert kv.allocate_slots(r, 7 - n, hits) is not None
        reqs.append(r)
    assert kv.num_free_blocks == 12 - (4 + 2 * 3)
    for r in reqs[::-1]:
        kv.free(r)
    assert_all_free(kv)
    assert kv.allocate_slots(make_req("big", list(range(24))), 24) is not None
    assert kv.num_free_blocks == 0


def test_eviction_is_least_recently_used_not_least_recently_freed():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_req("a", list(range(1, 10)))  # 2 full blocks + 1
    b = make_req("b", list(range(50, 59)))
    kv.allocate_slots(a, 9)
    kv.allocate_slots(b, 9)
    blocks_a, blocks_b = kv.get_block_ids("a"), kv.get_block_ids("b")
    kv.free(a)
    kv.free(b)
    # Free list: the spare blocks and both partial tails first, then a's full blocks (tail first), then b's.
    assert free_order(kv.pool)[-4:] == [blocks_a[1], blocks_a[0], blocks_b[1], blocks_b[0]]
    # A hit on a's head uses it again: it moves behind b's blocks.
    c = make_req("c", list(range(1, 5)) + [99, 98])
    hits, n = kv.get_computed_blocks(c)
    assert hits == blocks_a[:1] and n == 4
    kv.allocate_slots(c, 6 - n, hits)
    kv.free(c)
    assert free_order(kv.pool)[-1] == blocks_a[0]
    # Draining the pool evicts a's tail, then b's blocks, and a's (recently used) head last.
    kv.pool.allocate(kv.num_free_blocks - 3)
    assert free_order(kv.pool) == [blocks_b[1], blocks_b[0], blocks_a[0]]
    assert kv.pool.lookup(a.block_hashes[1]) is None  # evicted
    assert kv.pool.lookup(a.block_hashes[0]) == blocks_a[0]


def test_all_blocks_free_and_still_cached_after_a_mixed_workload():
    import random

    rng = random.Random(3)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 13))] for _ in range(3)]
    live: list[Request] = []
    registered: set[bytes] = set()
    for i in range(40):
        req = make_req(f"r{i}", rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 6))],
                       cache_salt=rng.choice([None, None, "t"]))
        hits, n = kv.get_computed_blocks(req)
        if kv.allocate_slots(req, req.num_tokens - n, hits) is None:
            continue
        req.num_computed_tokens = req.num_tokens
        for _ in range(rng.randrange(0, 6)):  # decode a few tokens
            req.output_token_ids.append(rng.randrange(1000))
            assert kv.allocate_slots(req, 1) is not None
            req.num_computed_tokens += 1
        live.append(req)
        held = [b for blocks in kv.req_to_blocks.values() for b in blocks]
        for block_id in set(held):  # ref count = number of requests holding the block
            assert kv.pool.blocks[block_id].ref_cnt == held.count(block_id)
        if rng.random() < 0.5 or len(live) > 6:
            done = live.pop(rng.randrange(len(live)))
            registered.update(done.block_hashes[:kv._num_cached_blocks.get(done.request_id, 0)])
            kv.free(done)
    for req in live:
        registered.update(req.block_hashes[:kv._num_cached_blocks.get(req.request_id, 0)])
        kv.free(req)
    assert_all_free(kv)
    assert kv.prefix_cache_hits > 0
    # Fewer distinct full blocks than the pool has, so nothing was evicted: every one is still findable.
    assert 0 < len(registered) < kv.num_blocks
    for h in registered:
        block_id = kv.pool.lookup(h)
        assert block_id is not None and kv.pool.blocks[block_id].block_hash == h
    assert kv.pool.num_cached_blocks == len(registered)


def test_hit_counters_count_only_requests_that_consulted_the_cache():
    prompt = list(range(1, 11))
    kv = KVCacheManager(num_blocks=16, block_size=4)
    kv.allocate_slots(make_req("a", prompt), 10)
    kv.allocate_slots(make_req("p", prompt, prompt_logprobs=1), 10)  # bypasses the cache
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    off = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    off.allocate_slots(make_req("a", prompt), 10)
    assert (off.prefix_cache_queries, off.prefix_cache_hits) == (0, 0)
    sibling = make_req("s", prompt)
    sibling.share_prefix = True  # n > 1 children consult it even with caching off
    hits, n = off.get_computed_blocks(sibling, use_cache=True)
    off.allocate_slots(sibling, 10 - n, hits)
    assert (off.prefix_cache_queries, off.prefix_cache_hits) == (10, 8)
