"""Sampler tests on hand-built logits: greedy, seeding, distributions, logits processors, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagellm.benchmarks.sampler_cost import bench_sampler
from pagellm.sample import Sampler, SamplingMetadata, SamplingRow, compute_logprobs_tensors
from pagellm.sample.ops import _TOP_P_WINDOWS, apply_logits_processors, apply_min_p, apply_top_k, apply_top_p
from pagellm.sampling_params import SamplingParams

CPU = torch.device("cpu")
INF = float("inf")


def row(params: SamplingParams, prompt=(), output=(), eos=()) -> SamplingRow:
    """A row with a fresh generator when the request is seeded (as the runner keeps one per request)."""
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), set(eos), gen)


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    meta = SamplingMetadata.build(rows, logits.shape[1], CPU)
    return Sampler()(logits, meta)


# -- 1. greedy and seeding --------------------------------------------------------------------

def test_greedy_top_k_1_and_temperature_0_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logits[5] = 0.0
    logits[5, [7, 30]] = 2.0  # a tie: the first index wins for every greedy flavour
    expected = logits.argmax(dim=-1)
    assert expected[5] == 7
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_k=1, top_p=0.5, min_p=0.2),
        SamplingParams(temperature=1e-6),
    ):
        rows = [row(params) for _ in range(6)]
        assert torch.equal(sample(logits, rows).sampled_token_ids, expected)
    # Greedy rows inside a mixed batch still take the argmax.
    mixed = [row(SamplingParams(temperature=0.0)) if i % 2 else row(SamplingParams(temperature=1.0)) for i in range(6)]
    out = sample(logits, mixed).sampled_token_ids
    assert torch.equal(out[1::2], expected[1::2])


def _mixed_batch_params() -> list[SamplingParams]:
    params = []
    for i in range(16):
        kind = i % 4
        if kind == 0:  # at 3.0 the nucleus outgrows the top-p window (full-sort fallback)
            params.append(SamplingParams(temperature=0.8 if i % 8 else 3.0, top_p=0.9, seed=100 + i))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.0))
        elif kind == 2:
            params.append(SamplingParams(temperature=1.2, top_k=20, min_p=0.01, seed=100 + i,
                                         repetition_penalty=1.3))
        elif i % 8 == 3:
            params.append(SamplingParams(temperature=1.0, top_k=5 + i))  # unseeded
        else:
            params.append(SamplingParams(temperature=0.9, seed=100 + i))  # no truncation
    return params


def test_seeded_rows_reproduce_alone_and_inside_a_mixed_batch():
    vocab, steps = 600, 6
    logits_per_step = [torch.randn(16, vocab, generator=torch.Generator().manual_seed(s)) * 2 for s in range(steps)]
    params = _mixed_batch_params()
    seeded = [i for i, p in enumerate(params) if p.seed is not None]

    def run_batch(indices: list[int], default_seed: int) -> dict[int, list[int]]:
        torch.manual_seed(default_seed)  # the default RNG must not matter to seeded rows
        gens = {i: torch.Generator().manual_seed(params[i].seed) if params[i].seed is not None else None
                for i in indices}
        outputs: dict[int, list[int]] = {i: [] for i in indices}
        for logits in logits_per_step:
            rows = [SamplingRow(params[i], [1, 2, 3], outputs[i][:], set(), gens[i]) for i in indices]
            tokens = sample(logits[indices], rows).sampled_token_ids.tolist()
            for i, t in zip(indices, tokens):
                outputs[i].append(t)
        return outputs

    in_batch = run_batch(list(range(16)), default_seed=1)
    for i in seeded:
        alone = run_batch([i], default_seed=2)
        assert alone[i] == in_batch[i], f"row {i} differs alone vs batched"
    # Same check with the seeded rows in a different order and company.
    reordered = run_batch(list(reversed(range(16)))[:12], default_seed=3)
    for i in seeded:
        if i in reordered:
            assert reordered[i] == in_batch[i]


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        r = row(p)
        return [sample(logits, [r]).sampled_token_ids.item() for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


# -- 2. distributions -------------------------------------------------------------------------

BASE = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]

# Chi-square critical values at p = 0.001 by degrees of freedom (standard statistical table).
CHI2_CRIT_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float,
                           min_p: float) -> list[float]:
    """The truncated, renormalised distribution, computed independently in float64 Python."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order[:top_k] if top_k > 0 else order)

    def probs_of(kept: set[int]) -> list[float]:
        z = sum(math.exp(scaled[i]) for i in kept)
        return [math.exp(scaled[i]) / z if i in kept else 0.0 for i in range(len(scaled))]

    if top_p < 1.0:
        probs = probs_of(keep)
        mass, nucleus = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            nucleus.add(i)
            mass += probs[i]
            if mass >= top_p:
                break
        keep = nucleus
    if min_p > 0.0:
        probs = probs_of(keep)
        top = max(probs)
        keep = {i for i in keep if probs[i] >= min_p * top}
    return probs_of(keep)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.3, 0, 1.0, 0.0),  # temperature only
        (1.0, 3, 1.0, 0.0),  # top-k
        (1.0, 0, 0.8, 0.0),  # top-p
        (1.0, 0, 1.0, 0.1),  # min-p
        (0.8, 6, 0.9, 0.05),  # all together
    ],
)
def test_sampled_histogram_matches_truncated_distribution(temperature, top_k, top_p, min_p):
    n = 2000
    expected = reference_distribution(BASE, temperature, top_k, top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # The rows of interest share the batch with greedy and differently truncated rows.
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, top_k=2), SamplingParams()]
    rows = [row(params) for _ in range(n)] + [row(p) for p in others for _ in range(10)]
    logits = torch.tensor(BASE).repeat(len(rows), 1)
    torch.manual_seed(1234)
    all_tokens = sample(logits, rows).sampled_token_ids
    tokens = all_tokens[:n]
    assert (all_tokens[n:n + 10] == 0).all()  # greedy neighbours
    assert set(all_tokens[n + 10:n + 20].tolist()) <= {0, 1}  # top_k=2 neighbours
    counts = torch.bincount(tokens, minlength=len(BASE)).tolist()

    for tok, p in enumerate(expected):
        if p == 0.0:
            assert counts[tok] == 0, f"token {tok} should have been truncated away"
    kept = [tok for tok, p in enumerate(expected) if p > 0.0]
    assert min(n * expected[t] for t in kept) >= 5  # chi-square needs enough expected counts
    stat = sum((counts[t] - n * expected[t]) ** 2 / (n * expected[t]) for t in kept)
    assert stat < CHI2_CRIT_0001[len(kept) - 1], (counts, [round(n * expected[t], 1) for t in kept])


def test_reference_distribution_truncates_as_documented():
    # Guards the reference itself: known kept sets for BASE.
    assert sum(p > 0 for p in reference_distribution(BASE, 1.0, 3, 1.0, 0.0)) == 3
    assert sum(p > 0 for p in reference_distribution(BASE, 1.0, 0, 0.8, 0.0)) == 4
    assert sum(p > 0 for p in reference_distribution(BASE, 1.0, 0, 1.0, 0.1)) == 5


def test_top_p_windows_and_full_sort_agree_with_reference():
    small, large = _TOP_P_WINDOWS
    vocab = 2 * large
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, vocab, generator=gen)
    logits[0] *= 8.0  # peaked: the nucleus sits inside the first window
    logits[1] *= 0.1  # nearly flat: the nucleus is larger than every window (full sort)
    logits[4] *= 2.5  # in between: the second window covers it
    probs = logits.softmax(dim=-1)
    top_p = torch.tensor([0.9, 0.9, 1.0, 0.5, 0.9])
    got = apply_top_p(probs, top_p)
    for i in range(5):
        order = probs[i].double().argsort(descending=True)
        before = torch.cumsum(probs[i].double()[order], 0) - probs[i].double()[order]
        n_keep = int((before < top_p[i].item()).sum()) if top_p[i] < 1 else vocab
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[order[:n_keep]] = True
        assert torch.equal(got[i] > 0, keep), f"row {i}"
        assert torch.equal(got[i][keep], probs[i][keep])
    assert (got[0] > 0).sum() < small < (got[4] > 0).sum() < large < (got[1] > 0).sum()


def test_truncation_keeps_ties_and_top_token():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert apply_top_k(logits, torch.tensor([2]), 2).tolist() == [[3.0, -INF, 2.0, 2.0, -INF]]
    probs = torch.tensor([[0.1, 0.6, 0.15, 0.15]])

    def kept(out: torch.Tensor) -> list[int]:
        assert torch.equal(out[out > 0], probs[out > 0])  # survivors are untouched
        return (out[0] > 0).nonzero().flatten().tolist()

    assert kept(apply_top_p(probs, torch.tensor([0.7]))) == [1, 2, 3]  # 0.6 < 0.7: both tied 0.15 stay
    assert kept(apply_top_p(probs, torch.tensor([1e-6]))) == [1]  # the top token always stays
    exact = torch.tensor([[0.25, 0.5, 0.25]])  # binary fractions: cumulative sums are exact
    assert (apply_top_p(exact, torch.tensor([0.5])) > 0).tolist() == [[False, True, False]]  # mass 0.5 reached
    assert (apply_top_p(exact, torch.tensor([0.75])) > 0).tolist() == [[True, True, True]]  # ties kept
    assert kept(apply_min_p(probs, torch.tensor([0.2]))) == [1, 2, 3]
    assert kept(apply_min_p(probs, torch.tensor([0.3]))) == [1]


# -- 3. logits processors ---------------------------------------------------------------------

RAW = [1.0, -2.0, 3.0, -4.0, 0.5, 2.0, -1.0, 0.0]


def processed(params: SamplingParams, prompt=(), output=(), eos=()) -> list[float]:
    raw = torch.tensor([RAW])
    meta = SamplingMetadata.build([row(params, prompt, output, eos)], len(RAW), CPU)
    out = apply_logits_processors(raw, meta)
    assert raw.tolist() == [RAW]  # never edited in place
    return out[0].tolist()


def with_changes(changes: dict[int, float]) -> list[float]:
    values = list(RAW)
    for tok, v in changes.items():
        values[tok] = v
    return values


def test_no_processors_leaves_logits_untouched():
    assert processed(SamplingParams(temperature=0.7, top_p=0.5), prompt=[0, 1], output=[2]) == RAW


def test_repetition_penalty_prompt_and_output():
    got = processed(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[2, 2])
    assert got == with_changes({0: 0.5, 1: -4.0, 2: 1.5})


def test_frequency_penalty_counts_output_only():
    got = processed(SamplingParams(frequency_penalty=0.5), prompt=[0], output=[2, 2, 4])
    assert got == with_changes({2: 2.0, 4: 0.0})


def test_presence_penalty_output_only():
    got = processed(SamplingParams(presence_penalty=1.5), prompt=[0], output=[2, 2, 4])
    assert got == with_changes({2: 1.5, 4: -1.0})


def test_penalties_combine():
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = processed(p, prompt=[5], output=[2, 2, 3])
    # token 5: prompt only -> 2 / 2; token 2: 3 / 2 - 2 * 0.5 - 0.25; token 3: -4 * 2 - 0.5 - 0.25
    assert got == with_changes({5: 1.0, 2: 0.25, 3: -8.75})


def test_logit_bias_adds_before_penalties():
    got = processed(SamplingParams(logit_bias={1: 5.0, 7: -2.5}))
    assert got == with_changes({1: 3.0, 7: -2.5})
    # The bias is applied first: token 1 becomes positive, so the penalty divides it.
    got = processed(SamplingParams(logit_bias={1: 5.0}, repetition_penalty=2.0), output=[1])
    assert got == with_changes({1: 1.5})


def test_allowed_token_ids_masks_everything_else():
    got = processed(SamplingParams(allowed_token_ids=[2, 5]))
    assert got == [-INF, -INF, 3.0, -INF, -INF, 2.0, -INF, -INF]


def test_bad_words():
    p = SamplingParams()
    p.bad_words_token_ids = [[3], [5, 6], [1, 5, 7]]
    assert processed(p, output=[1, 5]) == with_changes({3: -INF, 6: -INF, 7: -INF})
    assert processed(p, output=[2, 5]) == with_changes({3: -INF, 6: -INF})
    assert processed(p, output=[]) == with_changes({3: -INF})
    assert processed(p, prompt=[1, 5], output=[]) == with_changes({3: -INF})  # the prompt is not matched


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    p = SamplingParams(min_tokens=3, stop_token_ids=[4])
    assert processed(p, output=[0, 1], eos={7}) == with_changes({4: -INF, 7: -INF})
    assert processed(p, output=[0, 1, 2], eos={7}) == RAW
    p_ignore = SamplingParams(min_tokens=3, stop_token_ids=[4], ignore_eos=True)
    assert processed(p_ignore, output=[0], eos={7}) == with_changes({4: -INF})


def test_processors_only_touch_their_own_rows():
    p_pen = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={0: 1.0})
    p_bad = SamplingParams(min_tokens=5, allowed_token_ids=[0, 1, 2, 3, 7])
    rows = [row(p_pen, prompt=[3], output=[2]), row(SamplingParams()), row(p_bad, eos={7})]
    raw = torch.tensor([RAW] * 3)
    out = apply_logits_processors(raw, SamplingMetadata.build(rows, len(RAW), CPU)).tolist()
    assert out[0] == with_changes({0: 2.0, 2: 0.5, 3: -8.0})
    assert out[1] == RAW
    assert out[2] == [1.0, -2.0, 3.0, -4.0, -INF, -INF, -INF, -INF]


def test_processors_drive_sampling():
    logits = torch.tensor([RAW] * 400)
    greedy_bias = SamplingParams(temperature=0.0, logit_bias={7: 10.0})
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=[1, 6])
    rows = [row(greedy_bias)] * 200 + [row(allowed)] * 200
    torch.manual_seed(0)
    out = sample(logits, rows).sampled_token_ids
    assert (out[:200] == 7).all()
    assert set(out[200:].tolist()) == {1, 6}


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingMetadata.build([row(SamplingParams(logit_bias={8: 1.0}))], 8, CPU)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingMetadata.build([row(SamplingParams(allowed_token_ids=[9]))], 8, CPU)
    meta = SamplingMetadata.build([row(SamplingParams())], 8, CPU)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, 8), meta)
    with pytest.raises(ValueError, match="k must be"):
        compute_logprobs_tensors(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 9)


# -- 4. logprobs ------------------------------------------------------------------------------

def test_compute_logprobs_tensors_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 30) * 2
    targets = torch.tensor([0, 29, 3, 3, 17])
    lp = compute_logprobs_tensors(logits, targets, k=4)
    ref = torch.log_softmax(logits, dim=-1)
    assert lp.token_ids.shape == (5, 5) and lp.logprobs.dtype == torch.float32
    assert torch.equal(lp.token_ids[:, 0], targets)
    assert torch.equal(lp.logprobs[:, 0], ref.gather(-1, targets[:, None])[:, 0])
    order = ref.argsort(dim=-1, descending=True)
    assert torch.equal(lp.token_ids[:, 1:], order[:, :4])
    assert torch.equal(lp.logprobs[:, 1:], ref.gather(-1, order[:, :4]))
    assert (lp.logprobs[:, 1:-1] >= lp.logprobs[:, 2:]).all()
    position = (order == targets[:, None]).nonzero()[:, 1]
    assert torch.equal(lp.ranks, position + 1)


def test_logprobs_k0_returns_only_the_chosen_token():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    lp = compute_logprobs_tensors(logits, torch.tensor([1]), k=0)
    assert lp.token_ids.tolist() == [[1]]
    assert lp.ranks.tolist() == [2]
    # Ties share the better rank (1 + number of strictly more likely tokens).
    tied = compute_logprobs_tensors(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([2]), k=2)
    assert tied.ranks.tolist() == [1]
    assert tied.token_ids[0, 1:].tolist() in ([1, 2], [2, 1])
    assert torch.allclose(lp.logprobs, torch.log_softmax(logits, -1)[:, 1:2])


def test_sampler_logprobs_come_from_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 40)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.8, logit_bias={5: 20.0}),
            prompt=[1, 2]),
        row(SamplingParams(temperature=1.0, logprobs=0, top_k=5)),
        row(SamplingParams(temperature=0.0)),  # did not ask: still gets a row
        row(SamplingParams(temperature=0.9, top_p=0.7, seed=3, logprobs=1)),
    ]
    out = sample(logits, rows)
    assert out.sampled_token_ids[0] == 5  # the bias wins the greedy pick ...
    ref = torch.log_softmax(logits, dim=-1)
    lp = out.logprobs
    assert lp.token_ids.shape == (4, 4)  # ... but logprobs are of the raw logits, K = max asked
    assert torch.equal(lp.token_ids[:, 0], out.sampled_token_ids)
    assert torch.equal(lp.logprobs[:, 0], ref.gather(-1, out.sampled_token_ids[:, None])[:, 0])
    assert torch.equal(lp.token_ids[:, 1:], ref.topk(3, dim=-1).indices)
    assert torch.equal(lp.ranks, (ref > lp.logprobs[:, :1]).sum(-1) + 1)
    assert torch.equal(out.sampled_token_ids[2], logits[2].argmax())
    assert sample(logits, [row(SamplingParams())] * 4).logprobs is None


def test_bench_sampler_runs():
    result = bench_sampler(batch=4, vocab=512, steps=2)
    for key in ("greedy_ms", "mixed_ms", "penalties_ms"):
        assert result[key] > 0.0


def test_top_k_with_rows_that_do_not_limit_k():
    """Rows with k = vocab (top-p only) next to real top-k rows: the cheap path equals the plain definition."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=gen)
    top_k = torch.tensor([300, 5, 300, 40])
    got = apply_top_k(logits, top_k, 300)
    for i, k in enumerate(top_k.tolist()):
        kth = logits[i].sort(descending=True).values[k - 1]
        expected = logits[i].masked_fill(logits[i] < kth, float("-inf"))
        assert torch.equal(got[i], expected)
    assert torch.equal(apply_top_k(logits, torch.tensor([300] * 4), 300), logits)
