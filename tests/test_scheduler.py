"""Scheduler + KV cache manager, stepped by a fake model runner: no model, no tensors.

The fake runner keeps its own per-request state from the SchedulerOutputs (as the real
runner does), "writes KV" by storing each computed token id in its slot of a fake paged
cache, reads the whole context back through the block table before "sampling", and
samples a deterministic function of what it read. So a block handed to two requests, a
wrong prefix-cache hit or a lost token after preemption changes the generated tokens.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Callable, Optional

import pytest

from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler import RequestUpdate, Scheduler, SchedulerOutput
from pagellm.request import Request, RequestStatus
from pagellm.sampling_params import SamplingParams

EOS = 11
TokenFn = Callable[[list[int]], int]


def next_token(tokens: list[int]) -> int:
    """The fake model: a hash of the whole history, in [10, 60) (so EOS comes up now and then)."""
    h = 17
    for t in tokens:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return 10 + h % 50


def scripted(prompt_len: int, script: list[int]) -> TokenFn:
    """A fake model that emits `script` one token per step, whatever the context."""
    return lambda tokens: script[len(tokens) - prompt_len]


def reference(prompt: list[int], params: SamplingParams, eos: set[int], max_model_len: int,
              token_fn: TokenFn = next_token) -> tuple[list[int], str, object]:
    """What one request alone, generated token by token, must produce (the documented stop rules)."""
    tokens, out = list(prompt), []
    while True:
        t = token_fn(tokens)
        tokens.append(t)
        out.append(t)
        may_stop = len(out) >= params.min_tokens
        if may_stop and not params.ignore_eos and t in eos:
            return out, "stop", None
        if may_stop and t in params.stop_token_ids:
            return out, "stop", t
        if (params.max_tokens is not None and len(out) >= params.max_tokens) or len(tokens) >= max_model_len:
            return out, "length", None


class _State:
    def __init__(self, tokens: list[int], n_prompt: int, computed: int, blocks: list[int],
                 params: SamplingParams) -> None:
        self.tokens = tokens
        self.n_prompt = n_prompt
        self.computed = computed
        self.blocks = blocks
        self.params = params


class FakeRunner:
    def __init__(self, sched: Scheduler, token_fn: TokenFn = next_token) -> None:
        self.sched = sched
        self.token_fn = token_fn
        self.bs = sched.kv.block_size
        self.slots: dict[int, list[Optional[int]]] = defaultdict(lambda: [None] * self.bs)
        self.states: dict[str, _State] = {}
        self.outputs: dict[str, list[int]] = defaultdict(list)
        self.finish: dict[str, tuple[str, object]] = {}
        self.prompt_logprobs: dict[str, list] = defaultdict(list)
        self.admissions: list[tuple[str, int, list[int]]] = []  # (id, num_computed_tokens, output ids)
        self.finished_reports: Counter[str] = Counter()
        self.preempted_reports: Counter[str] = Counter()
        self.history: list[SchedulerOutput] = []
        self.num_preemption_steps = 0

    def step(self, between: Optional[Callable[[SchedulerOutput], None]] = None) -> list[RequestUpdate]:
        sched = self.sched
        prev_running = [r.request_id for r in sched.running]
        prev_waiting = [r.request_id for r in sched.waiting]
        out = sched.schedule()
        self.history.append(out)
        self._check_output(out, prev_running, prev_waiting)

        # Mirror the scheduler's view, as the real runner does.
        assert not (out.finished_req_ids & out.preempted_req_ids)
        for rid in out.finished_req_ids | out.preempted_req_ids:
            assert rid in self.states, f"{rid} reported to the runner twice, or never sent to it"
            del self.states[rid]
        self.finished_reports.update(out.finished_req_ids)
        self.preempted_reports.update(out.preempted_req_ids)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states
            self.states[new.req_id] = _State(new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids),
                                             new.num_computed_tokens, list(new.block_ids), new.sampling_params)
            self.admissions.append((new.req_id, new.num_computed_tokens, list(new.output_token_ids)))
        for cached in out.scheduled_cached_reqs:
            st = self.states[cached.req_id]
            assert st.computed == cached.num_computed_tokens
            st.blocks.extend(cached.new_block_ids)

        # "Forward": write every scheduled token's KV first, then attend (read back) and sample.
        for rid, n in out.num_scheduled_tokens.items():
            st = self.states[rid]
            assert n > 0 and st.computed + n <= len(st.tokens)
            assert st.blocks == sched.kv.get_block_ids(rid)
            assert len(st.blocks) * self.bs >= st.computed + n, "blocks do not cover the scheduled tokens"
            for p in range(st.computed, st.computed + n):
                self.slots[st.blocks[p // self.bs]][p % self.bs] = st.tokens[p]
        sampled: dict[str, list[int]] = {}
        prompt_lps: dict[str, list] = {}
        for rid, n in out.num_scheduled_tokens.items():
            st = self.states[rid]
            ctx, end = st.computed, st.computed + n
            seen = [self.slots[st.blocks[p // self.bs]][p % self.bs] for p in range(end)]
            assert seen == st.tokens[:end], f"{rid}: KV read through the block table is not its tokens"
            if st.params.prompt_logprobs is not None:
                last = min(end, st.n_prompt - 1)
                # Position p predicts prompt token p + 1: record which token each entry is for.
                prompt_lps[rid] = [(p + 1, st.tokens[p + 1]) for p in range(ctx, last)]
            st.computed = end
            if end == len(st.tokens):
                tok = self.token_fn(seen)
                st.tokens.append(tok)
                sampled[rid] = [tok]
        if between is not None:
            between(out)
        updates = sched.update_from_output(out, sampled, prompt_logprobs=prompt_lps)
        for u in updates:
            assert u.req_id not in self.finish, f"{u.req_id} got an update after finishing"
            self.outputs[u.req_id].extend(u.new_token_ids)
            if u.new_prompt_logprobs is not None:
                self.prompt_logprobs[u.req_id].extend(u.new_prompt_logprobs)
            if u.finish_reason is not None:
                self.finish[u.req_id] = (u.finish_reason, u.stop_reason)
        if out.preempted_req_ids:
            self.num_preemption_steps += 1
        check_invariants(sched)
        return updates

    def _check_output(self, out: SchedulerOutput, prev_running: list[str], prev_waiting: list[str]) -> None:
        sched = self.sched
        cached_ids = [c.req_id for c in out.scheduled_cached_reqs]
        new_ids = [n.req_id for n in out.scheduled_new_reqs]
        # Token budget and sequence cap, every step.
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= sched.max_num_seqs
        # Running requests first (in admission order), then waiting ones from the head of the queue.
        assert list(out.num_scheduled_tokens) == cached_ids + new_ids
        assert cached_ids == [r for r in prev_running if r in out.num_scheduled_tokens]
        assert new_ids == prev_waiting[:len(new_ids)]
        if new_ids:
            assert not out.preempted_req_ids  # nobody is admitted into a pool that just ran dry
            for c in out.scheduled_cached_reqs:  # running requests got all they need before admissions
                req = sched.requests[c.req_id]
                assert out.num_scheduled_tokens[c.req_id] == req.num_tokens - c.num_computed_tokens
            assert set(cached_ids) == set(prev_running)
        if not sched.enable_chunked_prefill:
            for n in out.scheduled_new_reqs:
                req = sched.requests[n.req_id]
                assert out.num_scheduled_tokens[n.req_id] == req.num_tokens - n.num_computed_tokens
        # Preemption takes the newest running requests.
        k = len(out.preempted_req_ids)
        if k:
            assert out.preempted_req_ids == set(prev_running[-k:])
        for rid in out.preempted_req_ids:
            req = sched.requests[rid]
            assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens == 0
            assert rid not in out.num_scheduled_tokens

    def run(self, max_steps: int = 2000, each_step: Optional[Callable[[int], None]] = None) -> None:
        """Steps until nothing is left, then once more so the runner hears of the last finished ids."""
        steps = 0
        while self.sched.has_unfinished_requests():
            if each_step is not None:
                each_step(steps)
            self.step()
            steps += 1
            assert steps < max_steps, "the scheduler made no progress"
        out = self.sched.schedule()
        assert out.is_empty and not out.preempted_req_ids
        for rid in out.finished_req_ids:
            assert rid in self.states
            del self.states[rid]
        self.finished_reports.update(out.finished_req_ids)
        assert self.states == {}, "the runner was never told some requests are gone"
        assert_all_freed(self.sched)


def check_invariants(sched: Scheduler) -> None:
    kv, pool = sched.kv, sched.kv.pool
    bs = kv.block_size
    running = {r.request_id: r for r in sched.running}
    assert len(running) == len(sched.running) <= sched.max_num_seqs
    assert set(sched.requests) == set(running) | {r.request_id for r in sched.waiting}
    assert not set(running) & {r.request_id for r in sched.waiting}
    assert set(kv.req_to_blocks) <= set(running), "a request that is not running holds blocks"
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and r.num_computed_tokens == 0
    # FCFS with preemption of the newest: everything running arrived before everything waiting,
    # and both queues stay in arrival order (`requests` keeps insertion order).
    arrival = {rid: i for i, rid in enumerate(sched.requests)}
    order = [arrival[r.request_id] for r in sched.running] + [arrival[r.request_id] for r in sched.waiting]
    assert order == sorted(order), "running + waiting is not in arrival order"
    holders: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for rid, r in running.items():
        assert r.status == RequestStatus.RUNNING
        blocks = kv.get_block_ids(rid)
        assert len(set(blocks)) == len(blocks)
        assert len(blocks) * bs >= r.num_computed_tokens, f"{rid}: blocks do not cover its computed tokens"
        for i, b in enumerate(blocks):
            holders[b].append((rid, i))
    for block in pool.blocks:
        held_by = holders.get(block.block_id, [])
        assert block.ref_cnt == len(held_by), f"block {block.block_id}: ref_cnt {block.ref_cnt} != {len(held_by)}"
        assert pool.is_free(block.block_id) == (block.ref_cnt == 0)
        if len(held_by) > 1:
            # Only a prefix-cache hit is shared: a cached full block at the same place in each
            # holder's table, holding the same tokens.
            assert block.block_hash is not None
            (rid0, i0), *rest = held_by
            toks = running[rid0].all_token_ids[i0 * bs:(i0 + 1) * bs]
            assert len(toks) == bs
            for rid, i in rest:
                assert i == i0 and running[rid].all_token_ids[i * bs:(i + 1) * bs] == toks
    assert kv.num_free_blocks == kv.num_blocks - len(holders)


def assert_all_freed(sched: Scheduler) -> None:
    """Once every request finished or was aborted, every block is back in the pool."""
    assert not sched.has_unfinished_requests()
    assert sched.requests == {} and sched.running == [] and not sched.waiting
    assert sched.kv.req_to_blocks == {}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert all(b.ref_cnt == 0 for b in sched.kv.pool.blocks)


def make_sched(*, num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
               max_num_batched_tokens: int = 64, max_model_len: int = 256, chunked: bool = True,
               prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, enable_chunked_prefill=chunked)


def add(sched: Scheduler, rid: str, prompt: list[int], *, eos: Optional[set[int]] = None,
        cache_salt: Optional[str] = None, **params) -> Request:
    params.setdefault("max_tokens", 8)
    req = Request(rid, prompt, SamplingParams(**params), eos_token_ids=eos, cache_salt=cache_salt)
    sched.add_request(req)
    return req


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(12, 60) for _ in range(n)]


def expect_reference(runner: FakeRunner, reqs: list[Request], eos_aware: bool = True) -> None:
    for r in reqs:
        out, reason, stop_reason = reference(r.prompt_token_ids, r.sampling_params, r.eos_token_ids,
                                             runner.sched.max_model_len, runner.token_fn)
        assert runner.outputs[r.request_id] == out, r.request_id
        assert runner.finish[r.request_id] == (reason, stop_reason), r.request_id


# -- budget, caps and order ----------------------------------------------------------------


def test_token_budget_and_max_num_seqs_every_step():
    sched = make_sched(max_num_seqs=3, max_num_batched_tokens=10)
    reqs = [add(sched, f"r{i}", prompt_of(n, i), max_tokens=5) for i, n in enumerate([7, 3, 12, 5, 9, 4])]
    runner = FakeRunner(sched)
    runner.run()  # every step checks the budget and the cap
    totals = [o.total_num_scheduled_tokens for o in runner.history if not o.is_empty]
    assert max(totals) == 10  # the budget is reached, never passed
    assert max(len(o.num_scheduled_tokens) for o in runner.history) == 3
    assert [a[0] for a in runner.admissions] == [r.request_id for r in reqs]  # FCFS
    expect_reference(runner, reqs)


def test_running_requests_come_before_waiting_ones_fcfs():
    sched = make_sched(max_num_seqs=3)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(4, 0), max_tokens=3)
    runner.step()
    b, c, d = (add(sched, rid, prompt_of(5, i), max_tokens=6) for i, rid in enumerate("bcd"))
    runner.step()
    out = runner.history[-1]
    assert [x.req_id for x in out.scheduled_cached_reqs] == ["a"]
    assert [x.req_id for x in out.scheduled_new_reqs] == ["b", "c"]
    assert list(out.num_scheduled_tokens) == ["a", "b", "c"]
    assert [r.request_id for r in sched.waiting] == ["d"]  # max_num_seqs
    runner.step()  # a finishes (3 tokens)
    assert "a" in runner.finish
    runner.step()
    out = runner.history[-1]
    assert out.finished_req_ids == {"a"}
    assert list(out.num_scheduled_tokens) == ["b", "c", "d"]
    runner.run()
    expect_reference(runner, [a, b, c, d])


def test_waiting_queue_is_strictly_fcfs():
    # The head does not fit while `a` decodes; a smaller request behind it must not jump the queue.
    sched = make_sched(max_num_batched_tokens=10, chunked=False)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(4, 1), max_tokens=4)
    runner.step()
    big = add(sched, "big", prompt_of(10, 2), max_tokens=1)
    small = add(sched, "small", prompt_of(2, 3), max_tokens=1)
    while "a" not in runner.finish:
        runner.step()
        assert list(runner.history[-1].num_scheduled_tokens) == ["a"]
    runner.step()
    assert list(runner.history[-1].num_scheduled_tokens) == ["big"]
    runner.run()
    assert [x[0] for x in runner.admissions] == ["a", "big", "small"]
    expect_reference(runner, [a, big, small])


# -- chunked prefill ------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt():
    sched = make_sched(max_num_batched_tokens=8)
    runner = FakeRunner(sched)
    r = add(sched, "r", prompt_of(25, 4), max_tokens=3)
    per_step = []
    for _ in range(6):
        updates = runner.step()
        per_step.append((runner.history[-1].num_scheduled_tokens["r"], [t for u in updates for t in u.new_token_ids]))
    assert [n for n, _ in per_step] == [8, 8, 8, 1, 1, 1]
    assert [len(toks) for _, toks in per_step] == [0, 0, 0, 1, 1, 1]  # nothing sampled mid-prompt
    runner.run()
    expect_reference(runner, [r])


def test_chunked_prefill_mixes_decodes_with_a_prompt_chunk():
    sched = make_sched(max_num_batched_tokens=8)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(3, 5), max_tokens=10)
    runner.step()
    b = add(sched, "b", prompt_of(20, 6), max_tokens=2)
    runner.step()
    out = runner.history[-1]
    assert out.num_scheduled_tokens == {"a": 1, "b": 7}
    assert out.total_num_scheduled_tokens == 8
    assert len(runner.outputs["a"]) == 2 and runner.outputs["b"] == []
    runner.step()
    assert runner.history[-1].num_scheduled_tokens == {"a": 1, "b": 7}
    runner.run()
    expect_reference(runner, [a, b])


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it():
    sched = make_sched(max_num_batched_tokens=10, chunked=False)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(4, 7), max_tokens=4)
    runner.step()
    b = add(sched, "b", prompt_of(10, 8), max_tokens=2)
    while "a" not in runner.finish:
        runner.step()
        assert "b" not in runner.history[-1].num_scheduled_tokens  # 1 decode token leaves only 9
    runner.step()
    assert runner.history[-1].num_scheduled_tokens == {"b": 10}
    runner.run()
    expect_reference(runner, [a, b])

    # The same with chunking on: b starts at once, in a 9-token chunk.
    sched = make_sched(max_num_batched_tokens=10, chunked=True)
    runner = FakeRunner(sched)
    add(sched, "a", prompt_of(4, 7), max_tokens=4)
    runner.step()
    add(sched, "b", prompt_of(10, 8), max_tokens=2)
    runner.step()
    assert runner.history[-1].num_scheduled_tokens == {"a": 1, "b": 9}
    runner.run()


# -- preemption -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_takes_the_newest_and_resumes_with_the_same_tokens(prefix_caching):
    # 6 blocks of 4: three requests of 4 + 12 tokens cannot all fit.
    sched = make_sched(num_blocks=6, max_num_seqs=3, prefix_caching=prefix_caching)
    runner = FakeRunner(sched)
    reqs = [add(sched, rid, prompt_of(4, 10 + i), max_tokens=12) for i, rid in enumerate("abc")]
    runner.step()
    reqs.append(add(sched, "d", prompt_of(4, 13), max_tokens=2))  # arrives later; max_num_seqs
    while not runner.history[-1].preempted_req_ids:
        runner.step()
    out = runner.history[-1]
    assert out.preempted_req_ids == {"c"}
    c = reqs[2]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert list(sched.waiting) == [c, reqs[3]]  # back at the head of the queue, ahead of later arrivals
    assert "c" not in sched.kv.req_to_blocks
    generated_before = list(runner.outputs["c"])
    assert generated_before
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    runner.run()
    # c came back as a new request carrying what it had generated, and recomputed it.
    resumed = [x for x in runner.admissions if x[0] == "c"][1:]
    assert resumed and resumed[0][2][:len(generated_before)] == generated_before
    if prefix_caching:
        assert resumed[0][1] % 4 == 0  # whatever of its own full blocks is still cached
    else:
        assert resumed[0][1] == 0
    assert sched.num_preemptions_total >= 1
    assert runner.preempted_reports["c"] >= 1
    expect_reference(runner, reqs)  # the same tokens as a run without preemption


def test_preemption_within_a_step_frees_enough_for_the_oldest():
    # a needs a block; b and c are preempted newest first until one frees enough.
    sched = make_sched(num_blocks=5, block_size=4)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(8, 20), max_tokens=9)  # 2 blocks, grows to 4
    b = add(sched, "b", prompt_of(3, 21), max_tokens=8)  # 1 block, grows to 3
    c = add(sched, "c", prompt_of(3, 22), max_tokens=8)
    runner.run()
    assert sched.num_preemptions_total >= 1
    assert runner.preempted_reports["a"] == 0  # the oldest is never the victim while others run
    expect_reference(runner, [a, b, c])


def test_preempted_request_resumes_from_its_own_cached_blocks():
    sched = make_sched(num_blocks=5)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(8, 25), max_tokens=5)  # 2 blocks, needs a 3rd in step 2
    c = add(sched, "c", prompt_of(9, 26), max_tokens=3)  # 2 full blocks + 1 partial
    runner.step()
    assert sched.kv.num_free_blocks == 0
    runner.step()
    assert runner.history[-1].preempted_req_ids == {"c"}
    # a took c's partial block; c's two cached full blocks are still free and findable.
    runner.run()
    assert [x[:2] for x in runner.admissions] == [("a", 0), ("c", 0), ("c", 8)]
    expect_reference(runner, [a, c])


def test_capacity_smaller_than_max_model_len_ends_with_length_instead_of_hanging():
    # 3 blocks of 4 = 12 tokens of KV, but max_model_len 100: a request may not outgrow the pool.
    sched = make_sched(num_blocks=3, max_model_len=100)
    runner = FakeRunner(sched)
    r = add(sched, "r", prompt_of(6, 30), max_tokens=50)
    s = add(sched, "s", prompt_of(5, 31), max_tokens=50)
    runner.run(max_steps=200)
    for req in (r, s):
        assert runner.finish[req.request_id] == ("length", None)
        assert req.num_tokens == 13  # the last token sampled from 12 tokens of KV
        assert runner.outputs[req.request_id] == reference(req.prompt_token_ids, req.sampling_params, set(), 13)[0]


# -- abort ----------------------------------------------------------------------------------


def test_abort_waiting_and_running_requests():
    sched = make_sched(max_num_seqs=2)
    runner = FakeRunner(sched)
    a, b, c, d = (add(sched, rid, prompt_of(6, 40 + i), max_tokens=6) for i, rid in enumerate("abcd"))
    runner.step()
    assert [r.request_id for r in sched.running] == ["a", "b"]
    free_before = sched.kv.num_free_blocks
    held_by_b = len(sched.kv.get_block_ids("b"))
    sched.finish_requests(["b", "c", "no-such-id"])
    assert sched.kv.num_free_blocks == free_before + held_by_b
    assert b.status == RequestStatus.FINISHED_ABORTED and c.status == RequestStatus.FINISHED_ABORTED
    assert "b" not in sched.requests and "c" not in sched.requests
    check_invariants(sched)
    runner.step()
    assert runner.history[-1].finished_req_ids == {"b"}  # c never reached the runner
    runner.run()
    for out in runner.history[1:]:
        seen = set(out.num_scheduled_tokens) | out.preempted_req_ids | {n.req_id for n in out.scheduled_new_reqs}
        assert not seen & {"b", "c"}
    assert "c" not in runner.outputs and runner.finished_reports["b"] == 1
    sched.finish_requests(["a"])  # already finished: ignored
    expect_reference(runner, [a, d])


def test_abort_while_the_step_runs_drops_its_output():
    sched = make_sched()
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(5, 50), max_tokens=6)
    b = add(sched, "b", prompt_of(5, 51), max_tokens=6)
    runner.step()
    new_a: list[Request] = []

    def abort_and_reuse_the_id(out: SchedulerOutput) -> None:
        sched.finish_requests(["a"])
        new_a.append(add(sched, "a", prompt_of(7, 52), max_tokens=3))  # not the request that ran

    updates = runner.step(between=abort_and_reuse_the_id)
    assert [u.req_id for u in updates] == ["b"]
    assert len(a.output_token_ids) == 1
    assert new_a[0].output_token_ids == [] and new_a[0].num_computed_tokens == 0
    del runner.outputs["a"]  # the first "a" was aborted; what follows belongs to the second
    runner.step()
    assert runner.history[-1].finished_req_ids == {"a"}
    assert [n.req_id for n in runner.history[-1].scheduled_new_reqs] == ["a"]
    runner.run()
    assert runner.finished_reports["a"] == 2
    expect_reference(runner, [b, new_a[0]])


def test_abort_of_a_preempted_request_is_not_reported_as_finished():
    sched = make_sched(num_blocks=6)
    runner = FakeRunner(sched)
    reqs = [add(sched, rid, prompt_of(4, 60 + i), max_tokens=12) for i, rid in enumerate("abc")]
    while not runner.history or not runner.history[-1].preempted_req_ids:
        runner.step()
    assert reqs[2].status == RequestStatus.PREEMPTED
    sched.finish_requests(["c"])
    runner.run()  # the fake runner fails if c were reported after its preemption
    assert runner.finished_reports["c"] == 0 and runner.preempted_reports["c"] == 1
    expect_reference(runner, reqs[:2])


def test_finished_and_preempted_ids_are_reported_once():
    sched = make_sched(num_blocks=8, max_num_batched_tokens=16)
    runner = FakeRunner(sched)
    reqs = [add(sched, f"r{i}", prompt_of(3 + i, 70 + i), max_tokens=10) for i in range(6)]
    runner.run()
    assert sched.num_preemptions_total > 0
    assert runner.finished_reports == Counter({r.request_id: 1 for r in reqs})
    assert sum(runner.preempted_reports.values()) == sched.num_preemptions_total
    expect_reference(runner, reqs)


# -- stop conditions --------------------------------------------------------------------------


def run_one(script: list[int], prompt_len: int = 5, max_model_len: int = 256, **params) -> tuple[list[int], tuple]:
    sched = make_sched(max_model_len=max_model_len)
    runner = FakeRunner(sched, scripted(prompt_len, script))
    eos = params.pop("eos", {EOS})
    add(sched, "r", prompt_of(prompt_len, 80), eos=eos, **params)
    runner.run()
    return runner.outputs["r"], runner.finish["r"]


def test_stop_on_eos():
    assert run_one([20, 21, EOS, 22, 23]) == ([20, 21, EOS], ("stop", None))


def test_ignore_eos_runs_to_max_tokens():
    assert run_one([20, 21, EOS, 22, 23], ignore_eos=True, max_tokens=5) == ([20, 21, EOS, 22, 23], ("length", None))


def test_stop_token_ids_set_the_stop_reason():
    assert run_one([20, 21, 22, 23], stop_token_ids=[22, 40]) == ([20, 21, 22], ("stop", 22))
    # A stop token id also stops an ignore_eos request.
    assert run_one([20, 40, 22], stop_token_ids=[40], ignore_eos=True) == ([20, 40], ("stop", 40))


def test_max_tokens_ends_with_length():
    assert run_one(list(range(20, 40)), max_tokens=4) == ([20, 21, 22, 23], ("length", None))


def test_max_model_len_ends_with_length():
    # 5 prompt tokens + 3 generated = max_model_len 8.
    assert run_one(list(range(20, 40)), max_model_len=8, max_tokens=100) == ([20, 21, 22], ("length", None))


def test_min_tokens_defers_eos_and_stop_tokens():
    assert run_one([EOS, 20, EOS, 21], min_tokens=2) == ([EOS, 20, EOS], ("stop", None))
    assert run_one([EOS, 20, EOS, 21]) == ([EOS], ("stop", None))
    assert run_one([30, 30, 30, 31], stop_token_ids=[30], min_tokens=3) == ([30, 30, 30], ("stop", 30))
    # max_tokens still applies while eos is deferred.
    assert run_one([EOS, EOS, EOS], min_tokens=2, max_tokens=2) == ([EOS, EOS], ("stop", None))
    assert run_one([EOS, 20, 21], min_tokens=2, max_tokens=2) == ([EOS, 20], ("length", None))


# -- intake errors -------------------------------------------------------------------------------


def test_add_request_errors():
    sched = make_sched(num_blocks=4, block_size=4, max_model_len=32)
    add(sched, "a", prompt_of(5, 90), max_tokens=2)
    with pytest.raises(ValueError, match="already in use"):
        add(sched, "a", prompt_of(3, 91))
    with pytest.raises(ValueError, match="max_model_len"):
        add(sched, "long", prompt_of(33, 92))
    with pytest.raises(ValueError, match="KV cache"):
        add(sched, "huge", prompt_of(16, 93))  # 16 tokens + 1 to generate > 4 blocks of 4
    assert list(sched.requests) == ["a"] and len(sched.waiting) == 1
    add(sched, "fits", prompt_of(15, 94), max_tokens=1)
    FakeRunner(sched).run()
    add(sched, "a", prompt_of(3, 95), max_tokens=1)  # the id is free again once a finished
    FakeRunner(sched).run()


# -- prefix caching through the scheduler ----------------------------------------------------------


def test_identical_prompts_admitted_in_one_step_share_blocks():
    sched = make_sched()
    runner = FakeRunner(sched)
    prompt = prompt_of(10, 100)
    a = add(sched, "a", prompt, max_tokens=5)
    b = add(sched, "b", prompt, max_tokens=5)
    c = add(sched, "c", prompt, max_tokens=5, prompt_logprobs=0)
    d = add(sched, "d", prompt, max_tokens=5, cache_salt="other")
    runner.step()
    out = runner.history[-1]
    computed = {n.req_id: n.num_computed_tokens for n in out.scheduled_new_reqs}
    assert computed == {"a": 0, "b": 8, "c": 0, "d": 0}
    assert out.num_scheduled_tokens == {"a": 10, "b": 2, "c": 10, "d": 10}
    blocks = {rid: sched.kv.get_block_ids(rid) for rid in "abcd"}
    assert blocks["b"][:2] == blocks["a"][:2]
    assert [sched.kv.pool.blocks[i].ref_cnt for i in blocks["a"]] == [2, 2, 1]
    runner.run()
    expect_reference(runner, [a, b, c, d])
    assert runner.outputs["a"] == runner.outputs["b"] == runner.outputs["c"]


def test_prefix_caching_off_shares_only_explicit_siblings():
    sched = make_sched(prefix_caching=False)
    runner = FakeRunner(sched)
    prompt = prompt_of(10, 101)
    a = add(sched, "a", prompt, max_tokens=3)
    b = add(sched, "b", prompt, max_tokens=3)
    sibling = Request("s", prompt, SamplingParams(max_tokens=3))
    sibling.share_prefix = True
    sched.add_request(sibling)
    runner.step()
    computed = {n.req_id: n.num_computed_tokens for n in runner.history[-1].scheduled_new_reqs}
    assert computed == {"a": 0, "b": 0, "s": 8}
    runner.run()
    expect_reference(runner, [a, b, sibling])


def test_prompt_logprobs_are_reported_once_across_chunks_and_preemption():
    sched = make_sched(num_blocks=7, max_num_batched_tokens=6)
    runner = FakeRunner(sched)
    a = add(sched, "a", prompt_of(5, 110), max_tokens=14)
    b = add(sched, "b", prompt_of(9, 111), max_tokens=12, prompt_logprobs=1)
    runner.run()
    assert b.num_preemptions >= 1  # recomputed its prompt at least once
    expected = [(p, b.prompt_token_ids[p]) for p in range(1, b.num_prompt_tokens)]
    assert runner.prompt_logprobs["b"] == expected
    assert "a" not in runner.prompt_logprobs
    expect_reference(runner, [a, b])


# -- randomized stress -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_randomized_stress(chunked):
    rng = random.Random(1234 if chunked else 4321)
    max_model_len = 64
    sched = make_sched(num_blocks=24, block_size=4, max_num_seqs=8, max_model_len=max_model_len,
                       max_num_batched_tokens=32 if chunked else 64, chunked=chunked)
    runner = FakeRunner(sched)
    prefixes = [prompt_of(rng.randrange(0, 13), 1000 + i) for i in range(5)]
    pending: list[Request] = []
    for i in range(200):
        prompt = (rng.choice(prefixes) + prompt_of(rng.randrange(1, 31), 2000 + i))[:max_model_len - 1]
        max_tokens = rng.randrange(1, 21)
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=rng.choice([0, 0, 0, min(3, max_tokens)]),
            ignore_eos=rng.random() < 0.2,
            stop_token_ids=[rng.randrange(10, 60)] if rng.random() < 0.3 else None,
            prompt_logprobs=1 if rng.random() < 0.1 else None,
        )
        pending.append(Request(f"r{i}", prompt, params, eos_token_ids={EOS} if rng.random() < 0.7 else None,
                               cache_salt="salted" if rng.random() < 0.1 else None))
    aborted: set[str] = set()

    def each_step(step: int) -> None:
        for _ in range(rng.randrange(0, 4)):
            if pending:
                sched.add_request(pending.pop(0))
        live = list(sched.requests)
        if live and rng.random() < 0.08:
            victim = rng.choice(live)
            sched.finish_requests([victim])
            aborted.add(victim)
            check_invariants(sched)

    all_reqs = list(pending)
    steps = 0
    while pending or sched.has_unfinished_requests():
        each_step(steps)
        if rng.random() < 0.03 and sched.running:
            victim = rng.choice(sched.running).request_id
            aborted.add(victim)
            runner.step(between=lambda out: sched.finish_requests([victim]))
        else:
            runner.step()
        steps += 1
        assert steps < 5000
    runner.run()

    assert sched.num_preemptions_total > 0 and runner.num_preemption_steps > 0
    assert 5 < len(aborted) < 100
    finished = [r for r in all_reqs if r.request_id not in aborted]
    expect_reference(runner, finished)
    for r in all_reqs:
        if r.request_id in aborted:
            ref = reference(r.prompt_token_ids, r.sampling_params, r.eos_token_ids, max_model_len)[0]
            assert runner.outputs[r.request_id] == ref[:len(runner.outputs[r.request_id])]
        if r.sampling_params.prompt_logprobs is not None and r.request_id not in aborted:
            assert runner.prompt_logprobs[r.request_id] == [
                (p, r.prompt_token_ids[p]) for p in range(1, r.num_prompt_tokens)]
    assert sched.kv.prefix_cache_hits > 0
    # Every request the runner saw was reported finished exactly once, unless it was aborted
    # while waiting after a preemption (the runner had already dropped it then).
    assert set(runner.finished_reports.values()) == {1}
    for rid in {a[0] for a in runner.admissions} - set(runner.finished_reports):
        assert rid in aborted and runner.preempted_reports[rid] >= 1
