"""Draft-model proposer: greedy proposals from a second model with its own paged KV cache.

A draft equal to the target must propose exactly the target's greedy continuation (every
proposal would be accepted); incremental calls that roll the draft's KV back must propose what a
fresh proposer does on the same history; batching, pool exhaustion and freeing are checked on
the draft's own block pool.
"""

import dataclasses
import json
import os
import shutil

import pytest

from pagellm import LLM, SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.setup import resolve_setup
from pagellm.spec_decode.config import SpeculativeConfig
from pagellm.spec_decode.draft_kv import DraftBlockTable, common_prefix_len
from pagellm.spec_decode.draft_model import DraftModelProposer
from tests.conftest import make_tiny_llama

K = 5
PROMPTS = [[7], [5, 6, 7, 8, 9, 10, 11], list(range(20, 60)), [300 + (i * 37) % 200 for i in range(23)]]


def _config(path: str, **kwargs) -> EngineConfig:
    return resolve_setup(EngineConfig(model=path, max_model_len=256, kv_cache_memory=4 << 20, **kwargs)).config


def _proposer(target: str, draft: str, k: int = K, **kwargs) -> DraftModelProposer:
    spec = SpeculativeConfig(method="draft_model", model=draft, num_speculative_tokens=k)
    return DraftModelProposer(_config(target), spec, **kwargs)


def _greedy(path: str, prompts, max_tokens: int) -> list[list[int]]:
    llm = LLM(path, skip_tokenizer_init=True, quiet=True, max_model_len=256, kv_cache_memory=4 << 20)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory) -> str:
    """A different tiny Llama with the same vocabulary (one layer, another seed)."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("draft-other")), seed=21, layers=1)


@pytest.fixture(scope="module")
def self_draft(tiny_llama) -> DraftModelProposer:
    return _proposer(tiny_llama, tiny_llama)


def _assert_pool_full(proposer: DraftModelProposer) -> None:
    assert proposer.num_free_blocks == proposer.num_blocks


def test_draft_equal_to_target_proposes_the_target_greedy_continuation(tiny_llama, self_draft):
    continuations = _greedy(tiny_llama, PROMPTS, K + 1 + K)
    ids = [f"same-{i}" for i in range(len(PROMPTS))]
    assert self_draft.propose(PROMPTS, [K] * len(PROMPTS), req_ids=ids) == [c[:K] for c in continuations]
    # ... and keeps doing so after every proposal was accepted (history + k proposals + bonus).
    longer = [p + c for p, c in zip(PROMPTS, continuations)]
    histories = [h[:len(p) + K + 1] for h, p in zip(longer, PROMPTS)]
    assert self_draft.propose(histories, [K] * len(PROMPTS), req_ids=ids) == \
        [h[len(p) + K + 1:] for h, p in zip(longer, PROMPTS)]
    for req_id in ids:
        self_draft.request_finished(req_id)
    _assert_pool_full(self_draft)


def test_a_different_draft_proposes_its_own_greedy_continuation(tiny_llama, other_draft):
    proposer = _proposer(tiny_llama, other_draft)
    assert proposer.propose(PROMPTS, [K] * len(PROMPTS)) == _greedy(other_draft, PROMPTS, K)
    _assert_pool_full(proposer)  # a call without req_ids keeps nothing


def test_rollback_after_partial_acceptance_matches_a_fresh_proposer(tiny_llama, other_draft):
    proposer = _proposer(tiny_llama, other_draft)
    fresh = _proposer(tiny_llama, other_draft)  # called without req_ids: keeps nothing between calls
    history = list(range(30, 63))  # 33 tokens: a third block
    first = proposer.propose([history], [K], req_ids=["r"])[0]
    assert len(first) == K
    assert proposer.table.tokens["r"] == history + first[:-1]  # the last proposal is never fed
    # Two accepted, then the target's own token instead of the third proposal.
    other = (first[2] + 1) % 512
    cases = [history + first[:2] + [other],
             history + first[:2] + [other] + [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15],  # past a block
             history[:10],  # preempted and recomputed shorter
             [44, 45] + history]  # same id, unrelated history: nothing kept
    for new_history in cases:
        got = proposer.propose([new_history], [K], req_ids=["r"])
        assert got == fresh.propose([new_history], [K]), new_history
        held = len(new_history) + K - 1
        assert proposer.num_blocks - proposer.num_free_blocks == -(-held // proposer.block_size)
    proposer.request_finished("r")
    _assert_pool_full(proposer)
    proposer.request_finished("r")  # twice, or never proposed for: nothing happens
    proposer.request_finished("never-seen")


def test_batched_requests_match_one_at_a_time(self_draft):
    histories = PROMPTS + [[], [1, 2, 3]]
    ks = [K, 3, 1, 2, 4, 0]
    ids = [f"b{i}" for i in range(len(histories))]
    batched = self_draft.propose(histories, ks, req_ids=ids)
    singles = [self_draft.propose([h], [k])[0] for h, k in zip(histories, ks)]
    assert batched == singles
    assert [len(p) for p in batched] == [K, 3, 1, 2, 0, 0]
    for req_id in ids:
        self_draft.request_finished(req_id)
    _assert_pool_full(self_draft)


def test_prefill_in_chunks_gives_the_same_proposals(tiny_llama, self_draft):
    spec = SpeculativeConfig(method="draft_model", model=tiny_llama, num_speculative_tokens=K)
    config = dataclasses.replace(_config(tiny_llama), max_num_batched_tokens=16)
    chunked = DraftModelProposer(config, spec, target_vocab_size=512)
    assert chunked.propose(PROMPTS, [K] * len(PROMPTS)) == self_draft.propose(PROMPTS, [K] * len(PROMPTS))


def test_pool_exhaustion_proposes_nothing_and_recovers(tiny_llama):
    proposer = _proposer(tiny_llama, tiny_llama, num_blocks=3)
    long_history = list(range(10, 50))  # 40 + 4 fed proposals = 44 tokens: all 3 blocks
    assert len(proposer.propose([long_history], [K], req_ids=["long"])[0]) == K
    assert proposer.num_free_blocks == 0
    short = [3, 4, 5]
    assert proposer.propose([short, list(range(100, 160))], [K, K], req_ids=["short", "huge"]) == [[], []]
    assert proposer.num_free_blocks == 0  # the refused requests hold nothing
    proposer.request_finished("long")
    assert len(proposer.propose([short], [K], req_ids=["short"])[0]) == K
    for req_id in ("short", "huge"):
        proposer.request_finished(req_id)
    _assert_pool_full(proposer)


def test_proposals_stop_at_the_shorter_context(tiny_llama, tmp_path):
    draft = str(tmp_path / "short-context")
    shutil.copytree(tiny_llama, draft)
    with open(os.path.join(draft, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = 64
    with open(os.path.join(draft, "config.json"), "w") as f:
        json.dump(config, f)
    proposer = _proposer(tiny_llama, draft)
    assert proposer.max_len == 64
    got = proposer.propose([list(range(62)), list(range(64)), list(range(10))], [K, K, K])
    assert [len(p) for p in got] == [2, 0, K]


def test_vocabulary_mismatch_is_refused(tiny_llama, tmp_path):
    small = make_tiny_llama(str(tmp_path / "small-vocab"), vocab_size=256)
    with pytest.raises(ValueError, match=r"speculative_config\.model.*256.*512"):
        _proposer(tiny_llama, small)
    with pytest.raises(ValueError, match=r"speculative_config\.model"):
        _proposer(tiny_llama, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="num_blocks"):
        _proposer(tiny_llama, tiny_llama, num_blocks=0)
    with pytest.raises(ValueError, match="kv_fraction"):
        _proposer(tiny_llama, tiny_llama, kv_fraction=1.5)


def test_bad_call_arguments(self_draft):
    with pytest.raises(ValueError, match="req_ids"):
        self_draft.propose([[1], [2]], [1, 1], req_ids=["x", "x"])
    with pytest.raises(ValueError, match="num_tokens"):
        self_draft.propose([[1], [2]], [1])
    _assert_pool_full(self_draft)


def test_block_table_rolls_back_reserves_and_frees():
    table = DraftBlockTable(num_blocks=4, block_size=4)
    assert table.rollback("a", [1, 2, 3, 4, 5, 6]) == 0
    assert table.reserve("a", 9)  # 3 blocks
    table.append("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert not table.reserve("b", 5) and table.num_free_blocks == 1  # needs 2: nothing taken
    # Accepted up to 7, then another token: keeps 7 tokens (2 blocks), frees the third.
    assert table.rollback("a", [1, 2, 3, 4, 5, 6, 7, 0, 11]) == 7 and table.num_free_blocks == 2
    # The last history token is always fed again, even when the draft already holds it.
    assert table.rollback("a", [1, 2, 3, 4, 5]) == 4 and table.num_free_blocks == 3
    assert common_prefix_len([1, 2, 3], (1, 2, 4, 5)) == 2 and common_prefix_len([], [1]) == 0
    table.free("a")
    table.free("a")
    assert table.num_free_blocks == 4
