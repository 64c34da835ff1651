"""Rejection sampler in isolation: emitted tokens follow the target distribution exactly."""

import pytest
import torch

from pagellm.sample.ops import apply_top_k, apply_top_p
from pagellm.spec_decode.rejection_sampler import PAD_TOKEN, one_hot_argmax, rejection_sample

DRAWS, K, VOCAB = 200_000, 3, 8
# chi-square critical values at p = 0.001 by degrees of freedom (no scipy in the environment)
_CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _target(filtering: bool) -> torch.Tensor:
    logits = torch.randn(K + 1, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    if not filtering:
        return logits.softmax(-1)
    logits = apply_top_k(logits, torch.full((K + 1,), 5), 5)
    probs = apply_top_p(logits.softmax(-1), torch.full((K + 1,), 0.8, dtype=torch.float64))
    return probs / probs.sum(-1, keepdim=True)


def _draws(target: torch.Tensor, with_draft_probs: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if with_draft_probs:
        q = (torch.randn(K, VOCAB, generator=gen, dtype=torch.float64) * 1.5).softmax(-1)
        drafts = torch.multinomial(q, DRAWS, replacement=True, generator=gen).T  # [DRAWS, K], row i ~ q
        draft_probs = q.expand(DRAWS, K, VOCAB)
    else:  # deterministic proposer: the same proposals for every row (one-hot q)
        drafts = target.argsort(-1, descending=True)[:K, 1].expand(DRAWS, K)  # second most likely: many rejections
        draft_probs = None
    return rejection_sample(drafts, torch.full((DRAWS,), K), target.expand(DRAWS, K + 1, VOCAB), draft_probs, gen)


@pytest.mark.parametrize("filtering", [False, True], ids=["plain", "top_k_top_p"])
@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_model", "one_hot"])
def test_emitted_tokens_follow_the_target(filtering, with_draft_probs):
    target = _target(filtering)
    out = _draws(target, with_draft_probs, seed=7)
    assert ((out.num_accepted >= 0) & (out.num_accepted <= K)).all()
    for j in range(K + 1):
        emitted = out.num_accepted >= j  # position j holds a token in these rows
        assert (out.token_ids[~emitted, j] == PAD_TOKEN).all()
        tokens = out.token_ids[emitted, j]
        if tokens.numel() < 1000:
            continue
        counts = torch.bincount(tokens, minlength=VOCAB).double()
        expected = target[j] * tokens.numel()
        assert (counts[expected == 0] == 0).all(), "a token outside the target's support was emitted"
        support = expected > 0
        statistic = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
        assert statistic < _CHI2_CRITICAL[int(support.sum()) - 1], (j, counts, expected)


def test_seeded_draws_are_reproducible_and_seed_dependent():
    target = _target(False)
    first, again, other = (_draws(target, True, seed=s) for s in (3, 3, 4))
    assert torch.equal(first.token_ids, again.token_ids)
    assert not torch.equal(first.token_ids, other.token_ids)


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    target = one_hot_argmax(torch.tensor([[[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]]]))
    argmax = [1, 0, 2, 0]
    cases = [([1, 0, 2], 3, [1, 0, 2, 0]), ([1, 2, 2], 1, [1, 0, PAD_TOKEN, PAD_TOKEN]),
             ([0, 0, 2], 0, [1, PAD_TOKEN, PAD_TOKEN, PAD_TOKEN])]
    drafts = torch.tensor([c[0] for c in cases])
    out = rejection_sample(drafts, torch.full((3,), 3), target.expand(3, 4, 3))
    assert out.num_accepted.tolist() == [c[1] for c in cases]
    assert out.token_ids.tolist() == [c[2] for c in cases]
    # fewer proposals than k: the token after the last proposal is the bonus
    short = rejection_sample(torch.tensor([[1, 9, 9]]), torch.tensor([1]), target)
    assert short.token_ids.tolist() == [[1, argmax[1], PAD_TOKEN, PAD_TOKEN]]
