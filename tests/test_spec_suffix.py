"""Suffix decoding proposer: trie counts against brute force, proposals from the request's own
history and from recent requests' outputs, caps, eviction, divergence, configuration."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pagellm.spec_decode import SpeculativeConfig
from pagellm.spec_decode.suffix import SuffixProposer, _Node, _Trie


def _brute_counts(seqs, depth: int) -> Counter:
    counts = Counter()
    for s in seqs:
        for i in range(len(s)):
            for d in range(1, min(depth, len(s) - i) + 1):
                counts[tuple(s[i:i + d])] += 1
    return counts


def _trie_counts(trie: _Trie) -> Counter:
    """Every path's count, references expanded; checks each node's bookkeeping on the way."""
    counts = Counter()

    def visit(node: _Node, path: tuple, depth: int) -> None:
        total = 0
        for token, child in node.children.items():
            if isinstance(child, _Node):
                counts[path + (token,)] += child.count
                total += child.count
                visit(child, path + (token,), depth + 1)
                continue
            seq, at = child
            assert seq[at] == token
            total += 1
            chain = seq[at: at + trie.max_depth - depth]
            for j in range(1, len(chain) + 1):
                counts[path + tuple(chain[:j])] += 1
        assert total == node.child_total
        if node.children and node.best is not None:
            best = node.children[node.best]
            assert node.best_count == (best.count if isinstance(best, _Node) else 1)
            assert node.best_count == max(c.count if isinstance(c, _Node) else 1 for c in node.children.values())

    visit(trie.root, (), 0)
    return +counts


def test_trie_counts_match_brute_force_through_inserts_extends_and_removals():
    rng = random.Random(0)
    for _ in range(60):
        depth = rng.randint(2, 6)
        trie = _Trie(depth)
        seqs = [[rng.randint(0, 3) for _ in range(rng.randint(0, 20))] for _ in range(rng.randint(1, 5))]
        stored = [trie.insert(s) for s in seqs]
        assert _trie_counts(trie) == _brute_counts(seqs, depth)
        keep = [rng.random() < 0.5 for _ in seqs]
        for kept, s in zip(keep, stored):
            if not kept:
                trie.remove(s)
        rest = [s for kept, s in zip(keep, seqs) if kept]
        assert _trie_counts(trie) == _brute_counts(rest, depth)
        grown, active = [], []  # a request's sequence, one token at a time, in the same trie
        for token in [rng.randint(0, 2) for _ in range(15)]:
            active = trie.extend(grown, active, token)
            assert _trie_counts(trie) == _brute_counts(rest + [grown], depth)


def test_proposes_the_continuation_of_a_repeated_span():
    span = list(range(100, 120))
    history = span + [7, 8] + span[:5]
    proposer = SuffixProposer()
    assert proposer.propose([history], [4], req_ids=["a"]) == [span[5:9]]
    # the match grows with the history; factor 1.0 lets a 9-token match propose 9
    assert proposer.propose([history + span[5:9]], [16], req_ids=["a"]) == [span[9:18]]
    assert proposer.propose([[1, 2, 3]], [4], req_ids=["b"]) == [[]]  # nothing repeats


def test_respects_num_tokens_min_prob_and_spec_factor():
    # (1, 2) continued with 3 twice and 4 once; (1, 2, 3) then with 90 once and 92 once
    history = [1, 2, 3, 90, 1, 2, 4, 91, 1, 2, 3, 92, 1, 2]
    def propose(k, **kwargs):
        return SuffixProposer(**kwargs).propose([history], [k], req_ids=["r"])[0]

    assert propose(0) == []
    assert propose(1) == [3]
    assert propose(4, min_token_prob=0.5) == [3]  # p(3) = 2/3, then 2/3 * 1/2 < 0.5
    assert propose(4, min_token_prob=0.7) == []
    two = propose(4, min_token_prob=0.1)  # a 2-token match allows 2 proposals at factor 1.0
    assert two[0] == 3 and two[1] in (90, 92) and len(two) == 2
    assert len(propose(4, min_token_prob=0.0, max_spec_factor=2.0)) == 4
    assert len(propose(3, min_token_prob=0.0, max_spec_factor=2.0)) == 3


def test_global_trie_serves_a_new_request_repeating_a_finished_output():
    rng = random.Random(1)
    prompt_a, output = rng.sample(range(1000), 30), rng.sample(range(3000, 4000), 40)  # no token in both
    proposer = SuffixProposer()
    proposer.propose([prompt_a + output[:1]], [4], req_ids=["a"], prompt_lens=[30])
    proposer.propose([prompt_a + output], [4], req_ids=["a"])
    proposer.request_finished("a")
    assert (proposer.num_active_requests, proposer.num_cached_requests) == (0, 1)

    prompt_b = [rng.randrange(1000, 2000) for _ in range(25)]
    assert proposer.propose([prompt_b + output[:6]], [4], req_ids=["b"]) == [output[6:10]]
    # only outputs are cached: a's prompt teaches the new request nothing
    assert proposer.propose([prompt_b + prompt_a[:10]], [4], req_ids=["c"]) == [[]]
    off = SuffixProposer(max_cached_requests=0)
    off.propose([prompt_a + output], [4], req_ids=["a"], prompt_lens=[30])
    off.request_finished("a")
    assert off.propose([prompt_b + output[:6]], [4], req_ids=["b"]) == [[]]


def test_the_better_scoring_trie_wins():
    proposer = SuffixProposer(min_token_prob=0.0)
    for i in range(3):  # three earlier answers all went 1 2 3 -> 40 41 42
        proposer.propose([[900 + i, 1, 2, 3, 40, 41, 42]], [0], req_ids=[f"old{i}"], prompt_lens=[1])
        proposer.request_finished(f"old{i}")
    # the request's own history is split between 50 and 60 after (1, 2, 3): the global trie is surer
    ambiguous = [1, 2, 3, 50, 7, 1, 2, 3, 60, 8, 1, 2, 3]
    assert proposer.propose([ambiguous], [3], req_ids=["r"]) == [[40, 41, 42]]
    # a request that repeated its own (1, 2, 3, 70, 71, 72) twice trusts itself over the cache (tie: own)
    repeated = [1, 2, 3, 70, 71, 72, 5, 1, 2, 3, 70, 71, 72, 6, 1, 2, 3]
    assert proposer.propose([repeated], [3], req_ids=["s"]) == [[70, 71, 72]]


def test_without_prompt_lens_the_first_history_is_taken_as_prompt_plus_one_token():
    proposer = SuffixProposer()
    prompt, output = list(range(500, 520)), list(range(600, 630))
    for n in range(1, len(output) + 1):
        proposer.propose([prompt + output[:n]], [2], req_ids=["a"])
    proposer.request_finished("a")
    assert proposer.propose([[1] + output[:4]], [3], req_ids=["b"]) == [output[4:7]]
    assert proposer.propose([[1] + prompt[:8]], [3], req_ids=["c"]) == [[]]


def test_cache_keeps_the_most_recent_finished_requests():
    proposer = SuffixProposer(max_cached_requests=2)
    outputs = {name: list(range(base, base + 20)) for name, base in (("a", 1000), ("b", 2000), ("c", 3000))}
    for name, out in outputs.items():
        proposer.propose([[0] + out], [0], req_ids=[name], prompt_lens=[1])
        proposer.request_finished(name)
    assert proposer.num_cached_requests == 2
    assert proposer.propose([[5] + outputs["a"][:6]], [3], req_ids=["x"]) == [[]]  # evicted
    assert proposer.propose([[5] + outputs["b"][:6]], [3], req_ids=["y"]) == [outputs["b"][6:9]]
    assert proposer.propose([[5] + outputs["c"][:6]], [3], req_ids=["z"]) == [outputs["c"][6:9]]
    assert _trie_counts(proposer._global) == _brute_counts([outputs["b"], outputs["c"]], proposer.max_depth)


def test_incremental_equals_fresh_and_a_diverged_history_is_rebuilt():
    rng = random.Random(2)
    span = [rng.randrange(50) for _ in range(12)]
    history = [rng.randrange(50) for _ in range(10)] + span + [rng.randrange(50) for _ in range(5)] + span
    live = SuffixProposer(max_tree_depth=8)
    for n in range(1, len(history) + 1):  # one token per step, as in decoding
        got = live.propose([history[:n]], [3], req_ids=["r"])
        assert got == SuffixProposer(max_tree_depth=8).propose([history[:n]], [3], req_ids=["r"])
    # recomputed after preemption to a shorter history, then a different continuation
    for diverged in (history[:20], history[:20] + span[:3], history[:-1] + [99]):
        assert live.propose([diverged], [3], req_ids=["r"]) == \
            SuffixProposer(max_tree_depth=8).propose([diverged], [3], req_ids=["r"])
        assert live._requests["r"].tokens == diverged


def test_needs_request_ids_and_checks_its_bounds():
    with pytest.raises(ValueError, match="req_ids"):
        SuffixProposer().propose([[1, 2]], [2])
    with pytest.raises(ValueError, match="suffix_max_tree_depth"):
        SuffixProposer(max_tree_depth=1)


def test_config_keys():
    config = SpeculativeConfig.from_dict({"method": "suffix", "suffix_max_tree_depth": 8,
                                          "suffix_max_cached_requests": 0, "suffix_max_spec_factor": 2.5,
                                          "suffix_min_token_prob": 0.0})
    proposer = SuffixProposer.from_config(config)
    assert (proposer.max_depth, proposer.max_cached_requests, proposer.max_spec_factor,
            proposer.min_token_prob) == (8, 0, 2.5, 0.0)
    assert SpeculativeConfig(method="suffix").suffix_max_tree_depth == 24


@pytest.mark.parametrize("value, key", [
    ({"method": "suffix", "suffix_max_tree_depth": 1}, "suffix_max_tree_depth"),
    ({"method": "suffix", "suffix_max_tree_depth": 4.0}, "suffix_max_tree_depth"),
    ({"method": "suffix", "suffix_max_cached_requests": -1}, "suffix_max_cached_requests"),
    ({"method": "suffix", "suffix_max_spec_factor": 0}, "suffix_max_spec_factor"),
    ({"method": "suffix", "suffix_max_spec_factor": float("nan")}, "suffix_max_spec_factor"),
    ({"method": "suffix", "suffix_min_token_prob": 1.5}, "suffix_min_token_prob"),
    ({"method": "suffix", "suffix_min_token_prob": True}, "suffix_min_token_prob"),
    ({"method": "ngram", "suffix_max_tree_depth": 8}, "suffix_max_tree_depth"),
    ({"method": "suffix", "suffix_depth": 8}, "suffix_depth"),
])
def test_bad_config_names_the_key(value, key):
    with pytest.raises(ValueError, match=rf"speculative_config\.{key}"):
        SpeculativeConfig.from_dict(value)
