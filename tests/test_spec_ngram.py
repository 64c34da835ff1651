"""N-gram prompt-lookup proposer."""

import pytest

from pagellm.spec_decode.ngram import NgramProposer


def test_proposes_what_followed_the_earliest_longest_match():
    proposer = NgramProposer(1, 3)
    history = [5, 6, 7, 8, 9, 1, 2, 6, 7]  # tail (6, 7) occurred at position 1, followed by 8, 9, 1
    assert proposer.propose([history], [3]) == [[8, 9, 1]]
    assert proposer.propose([history], [10]) == [[8, 9, 1, 2, 6, 7]]  # stops at the end of the history


def test_longer_ngram_wins_over_shorter():
    proposer = NgramProposer(1, 2)
    history = [3, 4, 9, 1, 4, 8, 1, 4]  # (1, 4) -> 8 beats the earlier single 4 -> 9
    assert proposer.propose([history], [1]) == [[8]]


def test_batch_rows_are_independent_and_misses_propose_nothing():
    proposer = NgramProposer(2, 3)
    rows = [[1, 2, 3, 1, 2], [1, 2, 3, 4], [7], []]
    assert proposer.propose(rows, [2, 2, 2, 2]) == [[3, 1], [], [], []]
    assert proposer.propose([[1, 2, 3, 1, 2]], [0]) == [[]]


def test_bad_bounds():
    with pytest.raises(ValueError, match="prompt_lookup"):
        NgramProposer(3, 2)
