"""The scheduler's speculative decoding, stepped by a fake runner that verifies proposals (no model).

The runner writes the KV of every scheduled token, proposals included, into a fake paged cache,
reads the context back through the block table, and accepts a proposal when it is what the fake
model would have produced there (greedy verification); then it proposes for the next step, right
with some probability and wrong otherwise. Whatever was proposed, every request must end with
exactly the tokens (and finish reason) it has alone without speculation, and the pool must hold
no block of a rejected proposal afterwards.
"""

from __future__ import annotations

import random

import pytest

from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler import Scheduler, SchedulerOutput
from pagellm.core.spec_scheduling import SpecScheduling
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from tests.test_scheduler import EOS, FakeRunner, _State, assert_all_freed, check_invariants, expect_reference, \
    next_token, prompt_of


class SpecFakeRunner(FakeRunner):
    def __init__(self, sched: Scheduler, rng: random.Random, p_right: float = 0.7) -> None:
        super().__init__(sched)
        self.rng = rng
        self.p_right = p_right
        self.proposed_steps = 0

    def _propose(self, tokens: list[int], n: int) -> list[int]:
        history, out = list(tokens), []
        for _ in range(n):
            true = next_token(history)
            t = true if self.rng.random() < self.p_right else self.rng.randrange(10, 60)
            out.append(t)
            history.append(t)
        return out

    def step(self, between=None):
        sched = self.sched
        out: SchedulerOutput = sched.schedule()
        self.history.append(out)
        assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
        for rid in out.finished_req_ids | out.preempted_req_ids:
            del self.states[rid]
        for new in out.scheduled_new_reqs:
            assert new.req_id not in out.scheduled_spec_decode_tokens  # proposals only for decodes
            self.states[new.req_id] = _State(new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids),
                                             new.num_computed_tokens, list(new.block_ids), new.sampling_params)
        for cached in out.scheduled_cached_reqs:
            st = self.states[cached.req_id]
            # The scheduler's computed count is the truth (rejected proposals were rolled back)...
            assert cached.num_computed_tokens <= len(st.tokens)
            st.computed = cached.num_computed_tokens
            # ... and so is its block list, which may have shrunk by the rejected proposals' blocks.
            assert cached.num_kept_blocks is not None and cached.num_kept_blocks <= len(st.blocks)
            st.blocks = st.blocks[:cached.num_kept_blocks] + list(cached.new_block_ids)
            assert st.blocks == sched.kv.get_block_ids(cached.req_id)
        sampled: dict[str, list[int]] = {}
        spec_out: dict[str, list[int]] = {}
        for rid, n in out.num_scheduled_tokens.items():
            st = self.states[rid]
            drafts = out.scheduled_spec_decode_tokens.get(rid, [])
            assert n == (1 + len(drafts) if drafts else n)
            if drafts:
                assert st.computed + 1 == len(st.tokens), "proposals verified outside decode"
                params = st.params
                assert len(drafts) <= sched.spec.k
                if params.max_tokens is not None:  # never overshoots max_tokens
                    assert len(st.tokens) - st.n_prompt + len(drafts) + 1 <= params.max_tokens
                assert len(st.tokens) + len(drafts) + 1 <= sched.max_model_len
            seq = st.tokens + drafts
            assert len(st.blocks) * self.bs >= st.computed + n, "blocks do not cover the scheduled tokens"
            for p in range(st.computed, st.computed + n):
                self.slots[st.blocks[p // self.bs]][p % self.bs] = seq[p]
            end = st.computed + n
            seen = [self.slots[st.blocks[p // self.bs]][p % self.bs] for p in range(end)]
            assert seen == seq[:end], f"{rid}: KV read through the block table is not its tokens"
            if end < len(st.tokens):
                st.computed = end
                continue
            # Verify: position len(tokens) - 1 + j predicts after tokens + drafts[:j].
            emitted = []
            for j in range(len(drafts) + 1):
                t = next_token(seen[:len(st.tokens) + j])
                emitted.append(t)
                if j == len(drafts) or drafts[j] != t:
                    break
            st.tokens.extend(emitted)
            st.computed = len(st.tokens) - 1
            sampled[rid] = emitted
            k = out.num_spec_tokens_to_propose.get(rid, 0)
            if k:
                spec_out[rid] = self._propose(st.tokens, k)
                self.proposed_steps += 1
        if between is not None:
            between(out)
        updates = sched.update_from_output(out, sampled, spec_token_ids=spec_out)
        for u in updates:
            assert u.req_id not in self.finish
            self.outputs[u.req_id].extend(u.new_token_ids)
            if u.finish_reason is not None:
                self.finish[u.req_id] = (u.finish_reason, u.stop_reason)
        for rid in out.num_scheduled_tokens:
            req = sched.requests.get(rid)
            if req is not None and req.status.value == "running":
                # The runner holds no token the scheduler does not (a stop cuts only finished requests).
                assert self.states[rid].tokens == req.all_token_ids
        check_invariants(sched)
        return updates


def make_spec_sched(*, k: int = 4, num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                    max_num_batched_tokens: int = 64, max_model_len: int = 256, prefix_caching: bool = True,
                    **spec) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, speculation=SpecScheduling(k, **spec))


def run_all(runner: SpecFakeRunner, max_steps: int = 3000) -> int:
    steps = 0
    while runner.sched.has_unfinished_requests():
        runner.step()
        steps += 1
        assert steps < max_steps
    runner.sched.schedule()
    return steps


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_outputs_equal_plain_decoding_under_preemption_and_chunking(prefix_caching):
    rng = random.Random(7)
    sched = make_spec_sched(num_blocks=22, max_num_batched_tokens=16, max_model_len=64, prefix_caching=prefix_caching)
    runner = SpecFakeRunner(sched, rng)
    shared = prompt_of(9, 99)
    reqs = []
    for i in range(24):
        prompt = (shared if i % 3 == 0 else []) + prompt_of(rng.randrange(2, 20), i)
        max_tokens = rng.randrange(1, 24)
        params = SamplingParams(max_tokens=max_tokens, min_tokens=rng.choice([0, 0, min(4, max_tokens)]),
                                ignore_eos=rng.random() < 0.3,
                                stop_token_ids=[rng.randrange(10, 60)] if rng.random() < 0.3 else None)
        req = Request(f"r{i}", prompt, params, eos_token_ids={EOS})
        sched.add_request(req)
        reqs.append(req)
    steps = run_all(runner)
    expect_reference(runner, reqs)
    assert_all_freed(sched)
    stats = sched.spec.stats
    assert sched.num_preemptions_total > 0
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # both outcomes happened
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1]
    total_out = sum(len(runner.outputs[r.request_id]) for r in reqs)
    assert steps < total_out  # speculation saved steps


def test_rejections_free_their_blocks_and_never_hash_proposals():
    rng = random.Random(3)
    sched = make_spec_sched(k=7, num_blocks=40, block_size=2, max_model_len=128)
    runner = SpecFakeRunner(sched, rng, p_right=0.2)  # mostly rejected
    reqs = [Request(f"r{i}", prompt_of(5, i), SamplingParams(max_tokens=30, ignore_eos=True)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished_requests():
        runner.step()
        for r in sched.running:
            blocks = sched.kv.get_block_ids(r.request_id)
            # After the rollback: blocks for the computed tokens only.
            assert len(blocks) == -(-r.num_computed_tokens // 2)
            # Hashes cover accepted tokens only: each equals the hash of the block's real tokens.
            clone = Request(r.request_id, r.prompt_token_ids, r.sampling_params)
            clone.output_token_ids = list(r.output_token_ids)
            true = sched.kv._hash_blocks(clone, r.num_tokens)
            assert r.block_hashes == true[:len(r.block_hashes)]
            for i, b in enumerate(blocks):
                block = sched.kv.pool.blocks[b]
                if block.block_hash is not None:
                    assert i < len(true) and block.block_hash == true[i]
    sched.schedule()
    expect_reference(runner, reqs)
    assert_all_freed(sched)
    assert sched.spec.stats.num_draft_tokens > 3 * sched.spec.stats.num_accepted_tokens


def test_abort_mid_verification_frees_everything():
    rng = random.Random(5)
    sched = make_spec_sched(num_blocks=30)
    runner = SpecFakeRunner(sched, rng, p_right=1.0)
    for i in range(4):
        sched.add_request(Request(f"r{i}", prompt_of(6, i), SamplingParams(max_tokens=40, ignore_eos=True)))
    aborted = 0
    for _ in range(60):
        if not sched.has_unfinished_requests():
            break
        out_holder = {}

        def abort_one(out):
            out_holder["out"] = out
            victims = [r for r in out.scheduled_spec_decode_tokens if r in sched.requests]
            if victims:
                sched.finish_requests(victims[:1])

        before = aborted
        runner.step(between=abort_one)
        aborted = before + (1 if out_holder["out"].scheduled_spec_decode_tokens else 0)
    assert aborted > 0
    run_all(runner)
    assert_all_freed(sched)


def test_budget_and_caps_trim_proposals():
    sched = make_spec_sched(k=6, max_num_batched_tokens=4, max_model_len=20)
    runner = SpecFakeRunner(sched, random.Random(1), p_right=1.0)
    req = Request("a", prompt_of(4, 1), SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add_request(req)
    run_all(runner)
    expect_reference(runner, [req])
    assert runner.finish["a"] == ("length", None) and len(runner.outputs["a"]) == 16  # max_model_len 20
    for out in runner.history:
        assert out.total_num_scheduled_tokens <= 4
        for drafts in out.scheduled_spec_decode_tokens.values():
            assert len(drafts) <= 3  # budget 4 = the last token + 3 proposals


def test_off_above_the_batch_size_threshold():
    sched = make_spec_sched(disable_by_batch_size=2)
    runner = SpecFakeRunner(sched, random.Random(2), p_right=1.0)
    reqs = [Request(f"r{i}", prompt_of(5, i), SamplingParams(max_tokens=4 + 12 * i, ignore_eos=True))
            for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    run_all(runner)
    expect_reference(runner, reqs)
    for out in runner.history:
        running = len(out.num_scheduled_tokens)
        if running > 2:
            assert not out.num_spec_tokens_to_propose and not out.scheduled_spec_decode_tokens
    assert sched.spec.stats.num_drafts > 0  # once one finished, the other two speculated


def test_poor_acceptance_pauses_a_request_then_retries():
    sched = make_spec_sched(k=4, min_acceptance_rate=0.5, acceptance_window=8)
    runner = SpecFakeRunner(sched, random.Random(4), p_right=0.0)  # every proposal wrong
    req = Request("a", prompt_of(5, 1), SamplingParams(max_tokens=60, ignore_eos=True))
    sched.add_request(req)
    run_all(runner)
    expect_reference(runner, [req])
    with_drafts = [bool(o.scheduled_spec_decode_tokens) for o in runner.history]
    # Two verification steps fill the window of 8 proposals, then 8 plain steps propose nothing; the
    # next asks for proposals again and the one after verifies them.
    assert with_drafts[1:3] == [True, True] and not any(with_drafts[3:12]) and with_drafts[12]


def test_grammar_requests_never_speculate():
    from pagellm.structured_output.params import StructuredOutputsParams

    sched = make_spec_sched()
    runner = SpecFakeRunner(sched, random.Random(6), p_right=1.0)
    req = Request("g", prompt_of(5, 1), SamplingParams(max_tokens=10, ignore_eos=True,
                                                        structured_outputs=StructuredOutputsParams(regex="[0-9]+")))
    sched.add_request(req)
    run_all(runner)
    assert all(not o.num_spec_tokens_to_propose and not o.scheduled_spec_decode_tokens for o in runner.history)


def test_best_draft_length_maximises_tokens_per_cost():
    from pagellm.core.spec_scheduling import best_draft_length

    assert best_draft_length([1.0] * 6, 0.2) == 6  # every proposal lands: all of them
    assert best_draft_length([0.05] * 6, 0.2) == 0  # none pays for its row
    assert best_draft_length([0.5] * 6, 0.0) == 6  # free rows: always k
    # 0.9, then 0.3 each: P(first j) = 0.9, 0.27, 0.081, ... ; values (1 + sum) / (1 + 0.2 j):
    # j=1 1.9/1.2 = 1.583, j=2 2.17/1.4 = 1.55: one proposal
    assert best_draft_length([0.9, 0.3, 0.3, 0.3], 0.2) == 1
    # the same with cheap rows (0.05): j=2 2.17/1.1 = 1.973 > j=1 1.9/1.05 = 1.810 > j=3 2.251/1.15 = 1.957
    assert best_draft_length([0.9, 0.3, 0.3, 0.3], 0.05) == 2


def _draft_lengths(p_right: float, seed: int) -> tuple[SpecFakeRunner, list[int]]:
    sched = make_spec_sched(k=6, draft_token_cost=0.2)
    runner = SpecFakeRunner(sched, random.Random(seed), p_right=p_right)
    req = Request("a", prompt_of(5, 1), SamplingParams(max_tokens=80, ignore_eos=True))
    sched.add_request(req)
    run_all(runner)
    expect_reference(runner, [req])
    return runner, [o.num_spec_tokens_to_propose.get("a", 0) for o in runner.history]


def test_draft_length_follows_the_requests_acceptance():
    from pagellm.core.spec_scheduling import PROBE_EVERY

    _, always_right = _draft_lengths(1.0, 7)
    # Before any verification the prior (0.8 per position) asks for 4; every proposal accepted: the full k.
    assert always_right[:2] == [4, 4] and set(always_right[2:-1]) == {6}, always_right
    runner, never_right = _draft_lengths(0.0, 8)
    # Every proposal rejected: the length falls to 0 within a few rows, then one-token probes follow,
    # PROBE_EVERY steps apart.
    first_zero = never_right.index(0)
    assert first_zero <= 10 and max(never_right[3:]) == 1, never_right
    tail = never_right[first_zero:-1]
    assert set(tail) == {0, 1} and tail.count(1) >= len(tail) // PROBE_EVERY - 1, tail
    assert all(b - a == PROBE_EVERY for a, b in zip([i for i, n in enumerate(tail) if n],
                                                    [i for i, n in enumerate(tail) if n][1:])), tail
    assert runner.sched.spec._rates == {} and runner.sched.spec._idle_steps == {}  # forgotten at the end
