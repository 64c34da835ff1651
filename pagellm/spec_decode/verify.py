"""The model runner's side of speculative decoding: verify the scheduled drafts, propose the next ones.

A request the scheduler sends with drafts d_1..d_k (`SchedulerOutput.scheduled_spec_decode_tokens`)
is a decode whose k + 1 scheduled tokens are its last token and the drafts, at positions
ctx .. ctx + k; its runner state never holds the drafts. One forward gives the target's logits
at all k + 1 positions; position j predicts what follows d_1..d_j.

Verification (`plan_verification` before the forward, `verify` after it):
  1. The logits rows: each plain sampling row's last position (exactly as without speculation),
     then every draft row's k + 1 positions.
  2. Plain rows go through the Sampler as in any step. Draft rows get the target distributions
     p_0..p_k from the same processors: `SamplingMetadataBuilder.build_speculative` makes row j
     see d_1..d_j as generated output (penalties, min_tokens, bad words), logit bias / allowed
     ids alike at every position; `Sampler.distributions` applies them and, for random rows,
     temperature / top-k / top-p / min-p. Greedy rows are one-hot at the processed argmax, which
     makes acceptance exact token matching.
  3. `rejection_sample` over all rows at once, q one-hot (every proposer here is deterministic);
     a seeded random row is verified alone with its own generator, so its draws depend on its
     own history only, whatever shares the batch.
  4. Emitted: the accepted drafts then the recovered / bonus token; logprobs of each emitted token
     from the raw target logits at its position (as the Sampler does).

The scheduler rolls its computed count back by the rejected drafts; the runner needs nothing of
the kind: the next step's num_computed_tokens is authoritative and the KV slots written for the
rejected drafts are overwritten later.

Proposing (`propose_drafts`, after sampling): histories are prompt + output including the tokens
just emitted; requests asking for 0 proposals are still shown to stateful proposers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pagellm.sample.logprobs import compute_logprobs_tensors, rows_to_lists
from pagellm.sample.metadata import SamplingMetadata, SamplingMetadataBuilder
from pagellm.sample.sampler import Sampler
from pagellm.spec_decode.proposer import Proposer
from pagellm.spec_decode.rejection_sampler import (PAD_TOKEN, accepted_prefix_length, emitted_tokens, one_hot_argmax,
                                                   rejection_sample)

# Per emitted token: (token ids [chosen, top-1, ...], their logprobs, rank): worker.outputs.LogprobsLists
LogprobsLists = list[tuple[list[int], list[float], int]]


@dataclass
class VerifyPlan:
    """A speculative step's logits layout and sampling tensors, built before its forward.

    `plain` and `spec` index the step's sampling rows (StepInputs.sample_rows)."""

    plain: list[int]  # sampling rows without drafts: one logits row each, first
    spec: list[int]  # sampling rows with drafts: 1 + k logits rows each, after the plain ones
    drafts: list[list[int]]  # per spec row
    logits_indices: torch.Tensor  # [P + sum(1 + k)] flat positions
    plain_meta: Optional[SamplingMetadata]  # the plain rows' usual metadata (None without plain rows)
    spec_meta: SamplingMetadata  # the expanded draft rows (build_speculative)
    draft_ids: torch.Tensor  # [S, k_max] long, padded with 0
    num_drafts: torch.Tensor  # [S] long
    row_of: torch.Tensor  # [N] spec row of each expanded row
    pos_of: torch.Tensor  # [N] its position 0..k
    starts: list[int]  # first expanded row of each spec row

    @property
    def num_plain(self) -> int:
        return len(self.plain)


def plan_verification(req_ids: Sequence[str], sample_rows: Sequence[int], num_drafts: Sequence[int],
                      drafts: dict[str, list[int]], query_start_loc: Sequence[int],
                      builder: SamplingMetadataBuilder, device: torch.device) -> VerifyPlan:
    """`num_drafts[i]`: drafts of batch row i (0 without); rows with drafts must be sampling rows."""
    sampling = set(sample_rows)
    if any(n and i not in sampling for i, n in enumerate(num_drafts)):
        raise ValueError("speculative drafts scheduled for a request that does not sample this step "
                         "(its scheduled tokens must be its last token + the drafts)")
    plain = [j for j, i in enumerate(sample_rows) if not num_drafts[i]]
    spec = [j for j, i in enumerate(sample_rows) if num_drafts[i]]
    indices = [query_start_loc[sample_rows[j] + 1] - 1 for j in plain]
    spec_drafts, starts, row_of, pos_of = [], [], [], []
    for s, j in enumerate(spec):
        i = sample_rows[j]
        k = num_drafts[i]
        spec_drafts.append(list(drafts[req_ids[i]]))
        end = query_start_loc[i + 1]
        starts.append(len(row_of))
        indices += range(end - 1 - k, end)
        row_of += [s] * (k + 1)
        pos_of += range(k + 1)
    k_max = max(len(d) for d in spec_drafts)
    padded = [d + [0] * (k_max - len(d)) for d in spec_drafts]
    plain_meta = builder.build([req_ids[sample_rows[j]] for j in plain]) if plain else None
    spec_meta = builder.build_speculative([req_ids[sample_rows[j]] for j in spec], spec_drafts)

    def on_device(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device)

    return VerifyPlan(plain, spec, spec_drafts, on_device(indices), plain_meta, spec_meta, on_device(padded),
                      on_device([len(d) for d in spec_drafts]), on_device(row_of), on_device(pos_of), starts)


def target_probs(sampler: Sampler, raw: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[N, V] target distributions: one-hot at the processed argmax for greedy rows."""
    processed, random_probs = sampler.distributions(raw, meta)
    if meta.all_random:
        return random_probs
    target = one_hot_argmax(processed)
    if random_probs is not None:
        target[meta.random_rows] = random_probs
    return target


def verify(plan: VerifyPlan, logits: torch.Tensor, sampler: Sampler, states: Sequence
           ) -> tuple[list[list[int]], list[Optional[LogprobsLists]]]:
    """Per spec row (`states[s]`: its CachedRequestState): the emitted tokens (accepted drafts, then
    the recovered or bonus token) and, when it asked for them, one logprobs entry per emitted token.
    `logits`: the target's logits at the spec rows' positions, in plan order."""
    meta = plan.spec_meta
    raw = logits.float()
    if meta.all_greedy:
        tokens = greedy_verify(plan, sampler.distributions(raw, meta)[0].argmax(dim=-1))
    else:
        tokens = _sampled_verify(plan, sampler, raw, states)
    return _emitted(plan, tokens, raw, states)


def greedy_verify(plan: VerifyPlan, target_ids: torch.Tensor) -> torch.Tensor:
    """[S, k_max + 1] emitted tokens (PAD after them) when every spec row is greedy: the drafts up to
    the first that differs from the target's argmax, then the argmax there (the bonus token when all
    match). This is what rejection sampling gives for one-hot targets, without building them."""
    num_rows, k_max = plan.draft_ids.shape
    argmax = torch.zeros(num_rows, k_max + 1, dtype=torch.long, device=target_ids.device)
    argmax[plan.row_of, plan.pos_of] = target_ids
    valid = torch.arange(k_max, device=target_ids.device).unsqueeze(0) < plan.num_drafts.unsqueeze(1)
    num_accepted = accepted_prefix_length((plan.draft_ids == argmax[:, :k_max]) & valid)
    next_token = argmax[torch.arange(num_rows, device=target_ids.device), num_accepted]
    return emitted_tokens(plan.draft_ids, num_accepted, next_token)


def _sampled_verify(plan: VerifyPlan, sampler: Sampler, raw: torch.Tensor, states: Sequence) -> torch.Tensor:
    """[S, k_max + 1] emitted tokens by rejection sampling (some rows sample)."""
    meta = plan.spec_meta
    target = target_probs(sampler, raw, meta)
    num_rows, k_max = plan.draft_ids.shape
    vocab = target.shape[1]
    if target.shape[0] == num_rows * (k_max + 1):  # every row has k_max drafts: no padding needed
        target3 = target.view(num_rows, k_max + 1, vocab)
    else:
        target3 = target.new_zeros(num_rows, k_max + 1, vocab)
        target3[plan.row_of, plan.pos_of] = target
    own = [s for s, st in enumerate(states) if st.generator is not None and not st.sampling_params.greedy]
    if not own:
        tokens = rejection_sample(plan.draft_ids, plan.num_drafts, target3).token_ids
    else:
        tokens = torch.full((num_rows, k_max + 1), PAD_TOKEN, dtype=torch.long, device=target.device)
        own_set = set(own)
        shared = [s for s in range(num_rows) if s not in own_set]
        if shared:
            idx = torch.tensor(shared, dtype=torch.long, device=target.device)
            tokens[idx] = rejection_sample(plan.draft_ids[idx], plan.num_drafts[idx], target3[idx]).token_ids
        for s in own:  # seeded: the request's own generator, over its own drafts only
            k = len(plan.drafts[s])
            out = rejection_sample(plan.draft_ids[s:s + 1, :k], plan.num_drafts[s:s + 1], target3[s:s + 1, :k + 1],
                                   generator=states[s].generator)
            tokens[s, :k + 1] = out.token_ids[0]
    return tokens


def _emitted(plan: VerifyPlan, tokens: torch.Tensor, raw: torch.Tensor, states: Sequence
             ) -> tuple[list[list[int]], list[Optional[LogprobsLists]]]:
    """Per spec row: its emitted tokens and, when asked, one logprobs entry per emitted token."""
    meta = plan.spec_meta
    num_rows = tokens.shape[0]
    want = [s for s, st in enumerate(states) if st.sampling_params.logprobs is not None]
    lps = None
    if want and meta.max_num_logprobs is not None:
        # The emitted token at every position (PAD past the emitted ones: any id, dropped below).
        lps = compute_logprobs_tensors(raw, tokens[plan.row_of, plan.pos_of].clamp(min=0), meta.max_num_logprobs)
    emitted = [[t for t in row if t != PAD_TOKEN] for row in tokens.tolist()]
    logprobs: list[Optional[LogprobsLists]] = [None] * num_rows
    if lps is not None:
        rows = [plan.starts[s] + j for s in want for j in range(len(emitted[s]))]
        lists = rows_to_lists(lps, rows, meta.max_num_logprobs)
        at = 0
        for s in want:
            k = states[s].sampling_params.logprobs
            n = len(emitted[s])
            logprobs[s] = [(ids[:k + 1], lp[:k + 1], rank) for ids, lp, rank in lists[at:at + n]]
            at += n
    return emitted, logprobs


def propose_drafts(proposer: Proposer, states: Sequence, num_to_propose: dict[str, int]) -> dict[str, list[int]]:
    """The next drafts of the requests that just sampled (`states`, their outputs updated) and that
    the scheduler asked proposals for; the others are shown to a stateful proposer with 0."""
    wanted = {s.req_id: max(int(num_to_propose.get(s.req_id, 0)), 0) for s in states}
    rows = list(states) if proposer.stateful else [s for s in states if wanted[s.req_id] > 0]
    if not rows:
        return {}
    num_tokens = [wanted[s.req_id] for s in rows]
    proposals = proposer.propose([s.prompt_token_ids + s.output_token_ids for s in rows], num_tokens,
                                 req_ids=[s.req_id for s in rows], prompt_lens=[len(s.prompt_token_ids) for s in rows])
    return {s.req_id: [int(t) for t in p[:n]] for s, p, n in zip(rows, proposals, num_tokens) if n > 0}
