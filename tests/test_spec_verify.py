"""The model runner's side of speculative decoding (pagellm/spec_decode/verify.py), driven by hand.

A small driver plays the scheduler: whole prompts in one step, then decodes whose scheduled tokens
are the last token plus the drafts a test picks (`scheduled_spec_decode_tokens`), rolling its
computed count back by the rejected drafts as the real scheduler does.

- Greedy: right, wrong and partially right drafts (of several lengths, beside a request without
  drafts) emit exactly the tokens of a run without drafts, as many as the drafts allow.
- The target distributions at draft position j equal what the plain Sampler computes for the
  request with d_1..d_j already in its output (penalties, logit bias, min_tokens, bad words,
  allowed ids, truncation).
- Logprobs: one entry per emitted token, equal to the run without drafts (greedy).
- A seeded random request with drafts emits the same tokens whatever shares its batch; a request
  without drafts in a speculative step samples exactly as in a step without speculation.
- With a speculative config the runner builds its proposer and returns its proposals; stateful
  proposers see every sampled request and hear about finished and preempted ones; the factory
  builds suffix and draft-model proposers (the draft's own runner has no proposer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from pagellm import SamplingParams
from pagellm.config import EngineConfig
from pagellm.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from pagellm.engine.setup import resolve_setup
from pagellm.sample import Sampler, SamplingMetadata, SamplingMetadataBuilder, SamplingRow
from pagellm.spec_decode.config import SpeculativeConfig
from pagellm.spec_decode.ngram import NgramProposer
from pagellm.spec_decode.proposer import Proposer
from pagellm.spec_decode.verify import target_probs
from pagellm.worker.outputs import ModelRunnerOutput
from pagellm.worker.worker import Worker

VOCAB = 512  # the tiny Llama's
BLOCK = 16
BLOCKS_PER_REQ = 8  # max_model_len 128
K = 3
GREEDY = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
PROMPTS = {
    "a": [11, 12, 13, 14, 15],
    "b": [300 + (7 * i) % 90 for i in range(19)],
    "c": [40, 41, 40, 41, 40],
    "d": [5],
}


def make_runner(path: str, spec: Optional[SpeculativeConfig] = None, num_reqs: int = 8):
    setup = resolve_setup(EngineConfig(model=path, skip_tokenizer_init=True, max_model_len=BLOCK * BLOCKS_PER_REQ,
                                       kv_cache_memory=4 << 20, block_size=BLOCK))
    config = setup.config
    if spec is not None:  # EngineConfig.resolve may refuse a speculative config: add it afterwards
        config = dataclasses.replace(config, speculative_config=spec)
    worker = Worker(config, setup.model_config)
    worker.load_model(setup.source)
    worker.initialize_kv_cache(BLOCKS_PER_REQ * num_reqs)
    return worker.model_runner


@dataclass
class _Req:
    prompt: list[int]
    params: SamplingParams
    blocks: list[int]
    output: list[int] = field(default_factory=list)
    computed: int = 0
    new: bool = True  # the runner holds no state for it (first step, or after preemption)


class Driver:
    """Plays the scheduler for one runner; every request has its blocks from the start."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.reqs: dict[str, _Req] = {}
        self.free_blocks = list(range(runner.num_blocks))
        self.finished: set[str] = set()
        self.preempted: set[str] = set()

    def add(self, req_id: str, prompt: list[int], params: SamplingParams) -> None:
        blocks, self.free_blocks = self.free_blocks[:BLOCKS_PER_REQ], self.free_blocks[BLOCKS_PER_REQ:]
        self.reqs[req_id] = _Req(list(prompt), params, blocks)

    def finish(self, req_id: str) -> None:
        self.free_blocks += self.reqs.pop(req_id).blocks
        self.finished.add(req_id)

    def preempt(self, req_id: str) -> None:
        req = self.reqs[req_id]
        req.computed, req.new = 0, True
        self.preempted.add(req_id)

    def output(self, req_id: str) -> list[int]:
        return self.reqs[req_id].output

    def step(self, drafts: Optional[dict[str, list[int]]] = None,
             propose: Optional[dict[str, int]] = None) -> ModelRunnerOutput:
        drafts = {r: d for r, d in (drafts or {}).items() if d}
        new, cached, qlens = [], [], {}
        for req_id, req in self.reqs.items():
            if req.new:
                assert req_id not in drafts
                new.append(NewRequestData(req_id, req.prompt, list(req.output), req.params, {2}, list(req.blocks),
                                          req.computed))
                qlens[req_id] = len(req.prompt) + len(req.output) - req.computed
            else:
                cached.append(CachedRequestData(req_id, [], req.computed))
                qlens[req_id] = 1 + len(drafts.get(req_id, []))
        sched = SchedulerOutput(new, cached, qlens, sum(qlens.values()), self.finished, self.preempted,
                                scheduled_spec_decode_tokens=drafts, num_spec_tokens_to_propose=propose or {})
        self.finished, self.preempted = set(), set()
        out = self.runner.execute(sched)
        for req_id, req in self.reqs.items():
            emitted, d = out.sampled_token_ids[req_id], drafts.get(req_id, [])
            assert 1 <= len(emitted) <= len(d) + 1 and emitted[:-1] == d[:len(emitted) - 1], (req_id, d, emitted)
            req.output += emitted
            # All but the newest token are computed: the rejected drafts' KV is left to be overwritten.
            req.computed, req.new = len(req.prompt) + len(req.output) - 1, False
        return out


def _run_plain(path: str, prompts: dict[str, list[int]], params: dict[str, SamplingParams], steps: int
               ) -> tuple[dict[str, list[int]], dict[str, list]]:
    """Tokens (and logprobs entries) of `steps` steps without drafts."""
    drv = Driver(make_runner(path))
    for req_id, prompt in prompts.items():
        drv.add(req_id, prompt, params[req_id])
    logprobs: dict[str, list] = {r: [] for r in prompts}
    for _ in range(steps):
        out = drv.step()
        for req_id, entries in out.logprobs.items():
            logprobs[req_id] += entries
    return {r: drv.output(r) for r in prompts}, logprobs


def _wrong(tokens: list[int]) -> list[int]:
    return [(t + 1) % VOCAB for t in tokens]


def _assert_logprobs_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (ids, lps, rank), (ids_ref, lps_ref, rank_ref) in zip(got, want):
        assert ids[0] == ids_ref[0] and rank == rank_ref
        assert lps == pytest.approx(lps_ref, abs=1e-4)
        assert set(ids[1:]) == set(ids_ref[1:]) or lps[1:] == pytest.approx(lps_ref[1:], abs=1e-4)


def test_greedy_with_drafts_emits_the_tokens_of_a_run_without(tiny_llama):
    params = {r: dataclasses.replace(GREEDY, logprobs=2) for r in PROMPTS}
    ref, ref_logprobs = _run_plain(tiny_llama, PROMPTS, params, steps=50)
    drv = Driver(make_runner(tiny_llama))
    for req_id, prompt in PROMPTS.items():
        drv.add(req_id, prompt, params[req_id])
    logprobs: dict[str, list] = {r: [] for r in PROMPTS}
    out = drv.step()  # the prompts
    for req_id, entries in out.logprobs.items():
        logprobs[req_id] += entries
    for step in range(10):
        drafts, expect = {}, {}
        for req_id in PROMPTS:
            done = len(drv.output(req_id))
            truth = ref[req_id][done:done + K]
            if req_id == "a":  # right, of length 1..K
                drafts[req_id] = truth[:1 + step % K]
                expect[req_id] = len(drafts[req_id]) + 1
            elif req_id == "b":  # all wrong
                drafts[req_id] = _wrong(truth)
                expect[req_id] = 1
            elif req_id == "c":  # the first m right
                m = step % (K + 1)
                drafts[req_id] = truth[:m] + _wrong(truth[m:])
                expect[req_id] = m + 1
            else:  # no drafts: a plain row in a speculative step
                expect[req_id] = 1
        out = drv.step(drafts)
        for req_id in PROMPTS:
            done = len(drv.output(req_id)) - len(out.sampled_token_ids[req_id])
            assert len(out.sampled_token_ids[req_id]) == expect[req_id], (step, req_id)
            assert out.sampled_token_ids[req_id] == ref[req_id][done:done + expect[req_id]], (step, req_id)
            assert len(out.logprobs[req_id]) == expect[req_id]  # one entry per emitted token
            logprobs[req_id] += out.logprobs[req_id]
    for req_id in PROMPTS:
        n = len(drv.output(req_id))
        assert drv.output(req_id) == ref[req_id][:n]
        _assert_logprobs_close(logprobs[req_id], ref_logprobs[req_id][:n])
    assert len(drv.output("a")) > 20  # the right drafts were accepted


PARAMS = {
    # greedy with penalties and a bias: the argmax moves with the drafts as output
    "pen": SamplingParams(temperature=0.0, repetition_penalty=1.6, frequency_penalty=0.7, presence_penalty=0.9,
                          logit_bias={3: 2.5, 9: -1.5}),
    # random with truncation, min_tokens over EOS / stop ids, and bad words (one of them multi-token)
    "rand": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, min_tokens=4, stop_token_ids=[7],
                           bad_words_token_ids=[[21, 22], [23]], frequency_penalty=0.3),
    "allowed": SamplingParams(temperature=1.3, allowed_token_ids=list(range(10, 40)), presence_penalty=0.5,
                              logit_bias={12: 1.0}),
    "plain": SamplingParams(temperature=0.9, seed=4),
}


def test_draft_positions_see_the_drafts_as_output():
    vocab = 64
    prompt = [3, 9, 21, 5, 5]
    outputs = {"pen": [3, 4, 9], "rand": [1, 21, 2], "allowed": [12, 13], "plain": [8]}
    drafts = {"pen": [3, 9, 3], "rand": [21, 2, 7], "allowed": [12], "plain": [30, 31]}
    builder = SamplingMetadataBuilder(vocab, torch.device("cpu"))
    for req_id, params in PARAMS.items():
        builder.add_request(req_id, SamplingRow(params, prompt, outputs[req_id], {2}))
    order = list(PARAMS)
    meta = builder.build_speculative(order, [drafts[r] for r in order])
    torch.manual_seed(0)
    logits = torch.randn(meta.num_rows, vocab) * 3
    sampler = Sampler()
    target = target_probs(sampler, logits, meta)
    row = 0
    for req_id in order:
        params = PARAMS[req_id]
        for j in range(len(drafts[req_id]) + 1):
            # The plain Sampler for a request whose output already holds d_1..d_j.
            alone = SamplingMetadata.build([SamplingRow(params, prompt, outputs[req_id] + drafts[req_id][:j], {2})],
                                           vocab, torch.device("cpu"))
            processed, probs = sampler.distributions(logits[row:row + 1], alone)
            if params.greedy:
                token = sampler(logits[row:row + 1], alone).sampled_token_ids.item()
                assert target[row].nonzero().flatten().tolist() == [token]
                assert target[row, token] == 1.0
            else:
                assert torch.equal(target[row], probs[0])
                assert target[row].sum().item() == pytest.approx(1.0)
            row += 1
    assert row == meta.num_rows
    # The bans really moved with the drafts: min_tokens stops banning the stop id at output length 4;
    # bad word [21, 22] bans 22 after an output ending in 21; [23] is always banned.
    processed, _ = sampler.distributions(logits, meta)
    start = sum(len(drafts[r]) + 1 for r in order[:order.index("rand")])
    neg_inf = float("-inf")
    assert processed[start, 7] == neg_inf and processed[start + 1, 7] > neg_inf
    assert processed[start + 1, 22] == neg_inf and processed[start, 22] > neg_inf
    assert (processed[start:start + 4, 23] == neg_inf).all()
    assert builder.requests["rand"].output_token_ids == [1, 21, 2]  # the drafts were not appended


SEEDED = SamplingParams(temperature=1.0, seed=123, allowed_token_ids=[10, 20], max_tokens=100, ignore_eos=True)


def _seeded_drafts(history: list[int]) -> list[int]:
    """Deterministic drafts from the history alone (half of them likely accepted: p is over two ids)."""
    return [10 if (len(history) + j) % 3 else 20 for j in range(K)]


def _run_seeded(path: str, companions: dict[str, SamplingParams], companion_drafts: bool) -> list[int]:
    drv = Driver(make_runner(path))
    drv.add("s", PROMPTS["b"], SEEDED)
    for i, (req_id, params) in enumerate(companions.items()):
        drv.add(req_id, PROMPTS["abcd"[i % 4]], params)
    drv.step()
    emitted = []
    for step in range(12):
        drafts = {"s": _seeded_drafts(PROMPTS["b"] + drv.output("s"))}
        if companion_drafts:
            for req_id in companions:
                drafts[req_id] = [(step * 31 + j) % VOCAB for j in range(1 + step % K)]
        out = drv.step(drafts)
        emitted.append(len(out.sampled_token_ids["s"]))
    assert 1 in emitted and max(emitted) > 2  # both rejections and acceptances happened
    return drv.output("s")


def test_seeded_request_with_drafts_is_reproducible_whatever_shares_the_batch(tiny_llama):
    torch.manual_seed(1)
    first = _run_seeded(tiny_llama, {"x": SamplingParams(temperature=0.8), "y": GREEDY}, companion_drafts=True)
    torch.manual_seed(2)
    second = _run_seeded(tiny_llama, {"p": SamplingParams(temperature=1.0, seed=5), "q": SamplingParams(temperature=0.5),
                                      "r": GREEDY, "t": SamplingParams(temperature=1.2, top_k=5)},
                         companion_drafts=False)
    alone = _run_seeded(tiny_llama, {}, companion_drafts=False)
    assert first == second == alone
    assert set(first) <= {10, 20}


def test_rows_without_drafts_sample_as_without_speculation(tiny_llama):
    """A seeded random request and a greedy one without drafts, beside requests with drafts."""
    plain = {"p": SamplingParams(temperature=0.9, seed=77, top_p=0.9), "g": GREEDY}
    prompts = {"p": PROMPTS["b"], "g": PROMPTS["a"]}
    ref, _ = _run_plain(tiny_llama, prompts, plain, steps=9)
    drv = Driver(make_runner(tiny_llama))
    for req_id in plain:
        drv.add(req_id, prompts[req_id], plain[req_id])
    drv.add("s1", PROMPTS["c"], GREEDY)
    drv.add("s2", PROMPTS["d"], SamplingParams(temperature=1.0))
    drv.step()
    for step in range(8):
        drv.step({"s1": [40, 41][:1 + step % 2], "s2": [1, 2, 3]})
    assert {r: drv.output(r) for r in plain} == ref


class _Recorder(Proposer):
    """A stateful proposer that proposes the last token again and records what it is shown."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], list[int], list[str], list[int]]] = []
        self.finished: list[str] = []

    def propose(self, histories, num_tokens, req_ids=None, prompt_lens=None):
        self.calls.append(([list(h) for h in histories], list(num_tokens), list(req_ids), list(prompt_lens)))
        return [[h[-1]] * (n + 1) for h, n in zip(histories, num_tokens)]  # more than asked: cut by the runner

    def request_finished(self, req_id: str) -> None:
        self.finished.append(req_id)


def test_proposer_sees_every_sampled_request_and_hears_about_finished_ones(tiny_llama):
    runner = make_runner(tiny_llama)
    runner.proposer = recorder = _Recorder()
    drv = Driver(runner)
    drv.add("a", PROMPTS["a"], GREEDY)
    drv.add("b", PROMPTS["b"], GREEDY)
    out = drv.step(propose={"a": 2})
    (histories, num_tokens, req_ids, prompt_lens), = recorder.calls
    assert req_ids == ["a", "b"] and num_tokens == [2, 0]
    assert prompt_lens == [len(PROMPTS["a"]), len(PROMPTS["b"])]
    assert histories == [PROMPTS["a"] + drv.output("a"), PROMPTS["b"] + drv.output("b")]
    assert out.spec_token_ids == {"a": [drv.output("a")[-1]] * 2}
    out = drv.step(drafts=out.spec_token_ids, propose={"a": 2, "b": 1})
    histories, num_tokens, req_ids, _ = recorder.calls[-1]
    assert histories[0] == PROMPTS["a"] + drv.output("a")  # with every token just emitted
    assert set(out.spec_token_ids) == {"a", "b"} and len(out.spec_token_ids["b"]) == 1
    drv.preempt("b")
    drv.finish("a")
    drv.step()
    assert sorted(recorder.finished) == ["a", "b"]
    assert recorder.calls[-1][2] == ["b"] and recorder.calls[-1][1] == [0]  # resumed: shown again


def test_ngram_config_builds_the_proposer_and_drafts_round_trip(tiny_llama):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=K, prompt_lookup_min=1, prompt_lookup_max=2)
    runner = make_runner(tiny_llama, spec)
    assert isinstance(runner.proposer, NgramProposer) and not runner.proposer.stateful
    ref, _ = _run_plain(tiny_llama, PROMPTS, {r: GREEDY for r in PROMPTS}, steps=40)
    drv = Driver(runner)
    for req_id, prompt in PROMPTS.items():
        drv.add(req_id, prompt, GREEDY)
    want = {r: K for r in PROMPTS if r != "d"}  # "d" is not asked: it gets nothing
    out = drv.step(propose=want)
    reference = NgramProposer(1, 2)
    accepted = 0
    for _ in range(12):
        assert set(out.spec_token_ids) == set(want)
        for req_id in want:
            history = PROMPTS[req_id] + drv.output(req_id)
            assert out.spec_token_ids[req_id] == reference.propose([history], [K])[0]
        drafts = out.spec_token_ids
        out = drv.step(drafts, propose=want)
        accepted += sum(len(out.sampled_token_ids[r]) - 1 for r in drafts)
    for req_id in PROMPTS:
        assert drv.output(req_id) == ref[req_id][:len(drv.output(req_id))]
    assert accepted > 0


def test_factory_builds_suffix_and_a_draft_model_that_does_not_recurse(tiny_llama):
    from pagellm.spec_decode.draft_model import DraftModelProposer
    from pagellm.spec_decode.suffix import SuffixProposer

    assert isinstance(make_runner(tiny_llama, SpeculativeConfig(method="suffix")).proposer, SuffixProposer)
    runner = make_runner(tiny_llama, SpeculativeConfig(method="draft_model", model=tiny_llama,
                                                       num_speculative_tokens=K))
    assert isinstance(runner.proposer, DraftModelProposer)
    assert runner.proposer.runner.proposer is None and runner.proposer.config.speculative_config is None
    ref, _ = _run_plain(tiny_llama, {"a": PROMPTS["a"]}, {"a": GREEDY}, steps=20)
    drv = Driver(runner)
    drv.add("a", PROMPTS["a"], GREEDY)
    out = drv.step(propose={"a": K})
    for _ in range(4):  # the draft is the target: every proposal is accepted
        out = drv.step(out.spec_token_ids, propose={"a": K})
        assert len(out.sampled_token_ids["a"]) == K + 1
    assert drv.output("a") == ref["a"][:len(drv.output("a"))]
    drv.finish("a")
    drv.step()
    assert runner.proposer.num_free_blocks == runner.proposer.num_blocks


def test_greedy_verify_equals_rejection_sampling_of_one_hot_targets():
    """The all-greedy shortcut gives what the rejection sampler gives for one-hot targets, over ragged
    draft counts (0..k), right and wrong drafts, and argmax ties (first index wins, as argmax)."""
    from pagellm.spec_decode.rejection_sampler import one_hot_argmax, rejection_sample
    from pagellm.spec_decode.verify import VerifyPlan, greedy_verify

    gen = torch.Generator().manual_seed(3)
    vocab, k = 7, 4
    for trial in range(200):
        num_drafts = torch.randint(0, k + 1, (5,), generator=gen)
        row_of = torch.cat([torch.full((int(n) + 1,), s) for s, n in enumerate(num_drafts)])
        pos_of = torch.cat([torch.arange(int(n) + 1) for n in num_drafts])
        logits = torch.randint(0, 3, (len(row_of), vocab), generator=gen).float()  # many ties
        target_ids = logits.argmax(dim=-1)
        drafts = torch.randint(0, vocab, (5, k), generator=gen)
        right = torch.rand(5, k, generator=gen) < 0.6  # make most drafts the target's token
        full = torch.zeros(5, k + 1, dtype=torch.long)
        full[row_of, pos_of] = target_ids
        drafts = torch.where(right, full[:, :k], drafts)
        drafts = torch.where(torch.arange(k) < num_drafts.unsqueeze(1), drafts, torch.zeros_like(drafts))
        plan = VerifyPlan(plain=[], spec=list(range(5)), drafts=[d[:n].tolist() for d, n in zip(drafts, num_drafts)],
                          logits_indices=torch.arange(len(row_of)), plain_meta=None, spec_meta=None,
                          draft_ids=drafts, num_drafts=num_drafts, row_of=row_of, pos_of=pos_of, starts=[])
        target3 = torch.zeros(5, k + 1, vocab)
        target3[row_of, pos_of] = one_hot_argmax(logits)
        expect = rejection_sample(drafts, num_drafts, target3, generator=torch.Generator().manual_seed(trial))
        assert torch.equal(greedy_verify(plan, target_ids), expect.token_ids), trial
