"""The scheduler's half of speculative decoding: which requests speculate, how far, and what it earned.

A request in decode carries the proposals its runner made after its last step
(`Request.spec_token_ids`). The scheduler may schedule them after its last token, as 1 + k tokens
of one verification forward; the runner then returns the accepted proposals plus one token of its
own, and the proposals it rejected are rolled back here (computed count, and the KV blocks past
the accepted tokens). Pure Python: the scheduler and this module know tokens, never tensors.

Speculation is off for a step whose batch has more running requests than `disable_by_batch_size`
(verifying k extra positions for every request then costs more compute than the saved steps are
worth), and for a request whose acceptance over its last `acceptance_window` proposed tokens is
below `min_acceptance_rate`: it decodes plainly for as many steps as the window is long, then tries
again with a fresh count.

How far a request speculates (`draft_length`) follows its own acceptance when `draft_token_cost`
is set: verifying one more proposal costs that fraction of a plain decode step, and the j-th proposal
only pays when all j are accepted. So from the request's acceptance rate at each position (given
the ones before it were accepted; its recent rows, pulled towards the engine-wide rate, and where
that is thin towards the position before), the draft length is the j <= k that maximises
(expected tokens per step) / (step cost) = (1 + sum_{i<=j} P(first i accepted)) / (1 + cost * j). A request for which no length pays proposes
nothing, and probes with one proposal every `PROBE_EVERY` steps so it notices when that changes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from pagellm.request import Request


@dataclass
class SpecDecodeStats:
    """Counts since start: verification rows, proposed and accepted tokens, accepted per position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification row emits on average: its accepted proposals plus the target's own."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class _Acceptance:
    """One request's recent (proposed, accepted) counts, and how long it is paused."""

    __slots__ = ("window", "proposed", "accepted", "paused_steps")

    def __init__(self) -> None:
        self.window: deque[tuple[int, int]] = deque()
        self.proposed = 0
        self.accepted = 0
        self.paused_steps = 0


class _PositionRates:
    """Per draft position: how often it was verified (every earlier proposal accepted) and accepted.
    A request's counts decay by `DECAY` per verification row, so they follow its recent text."""

    __slots__ = ("tested", "accepted")

    def __init__(self, k: int) -> None:
        self.tested = [0.0] * k
        self.accepted = [0.0] * k

    def add(self, drafted: int, accepted: int, decay: float = 1.0) -> None:
        if decay != 1.0:
            self.tested = [t * decay for t in self.tested]
            self.accepted = [a * decay for a in self.accepted]
        for i in range(min(accepted + 1, drafted)):  # positions up to the first rejection were verified
            self.tested[i] += 1.0
        for i in range(accepted):
            self.accepted[i] += 1.0


DECAY = 0.9  # a request's position counts: ~10 recent rows weigh most
PRIOR_WEIGHT = 2.0  # pseudo-rows of the prior (engine-wide, else the previous position) in an estimate
FIRST_POSITION_PRIOR = 0.8  # before anything was verified: speculate
PROBE_EVERY = 8  # steps between one-token probes of a request no draft length pays for


def best_draft_length(rates: list[float], cost: float) -> int:
    """The j (0..len(rates)) maximising (1 + sum_{i<=j} prod_{l<=i} rates[l]) / (1 + cost * j)."""
    best, best_value, expected, reach = 0, 1.0, 1.0, 1.0
    for j, rate in enumerate(rates, start=1):
        reach *= rate
        expected += reach
        value = expected / (1.0 + cost * j)
        if value > best_value:
            best, best_value = j, value
    return best


class SpecScheduling:
    def __init__(self, num_speculative_tokens: int, *, disable_by_batch_size: int = 0,
                 min_acceptance_rate: float = 0.0, acceptance_window: int = 64,
                 draft_token_cost: float = 0.0) -> None:
        self.k = num_speculative_tokens
        self.disable_by_batch_size = disable_by_batch_size
        self.min_acceptance_rate = min_acceptance_rate
        self.acceptance_window = acceptance_window
        self.draft_token_cost = draft_token_cost  # 0: always k proposals
        self.stats = SpecDecodeStats(accepted_per_position=[0] * num_speculative_tokens)
        self._acceptance: dict[str, _Acceptance] = {}
        self._global_rates = _PositionRates(num_speculative_tokens)
        self._rates: dict[str, _PositionRates] = {}
        self._idle_steps: dict[str, int] = {}  # requests no draft length pays for: steps since a probe

    @classmethod
    def from_config(cls, spec_config, device: str = "cpu") -> Optional["SpecScheduling"]:
        """From a pagellm.spec_decode.SpeculativeConfig (None: speculation off), on `device`."""
        if spec_config is None:
            return None
        return cls(spec_config.num_speculative_tokens, disable_by_batch_size=spec_config.disable_by_batch_size,
                   min_acceptance_rate=spec_config.min_acceptance_rate,
                   acceptance_window=spec_config.acceptance_window,
                   draft_token_cost=spec_config.resolved_draft_token_cost(device))

    # -- per step -------------------------------------------------------------------
    def batch_allows(self, num_running: int) -> bool:
        return self.disable_by_batch_size == 0 or num_running <= self.disable_by_batch_size

    def may_speculate(self, request: Request) -> bool:
        """Whether the request may be given proposals at all (grammar-constrained ones never are:
        their matcher advances one sampled token at a time)."""
        if request.sampling_params.structured_outputs is not None:
            return False
        state = self._acceptance.get(request.request_id)
        return state is None or state.paused_steps == 0

    def num_drafts(self, request: Request, budget: int, max_model_len: int, kv_capacity_tokens: int) -> int:
        """How many of the request's proposals fit this step: the token budget (its last token comes
        first), max_tokens (the row emits up to k + 1 tokens and must never overshoot) and the
        model length / pool size (every proposal needs a position and a KV slot)."""
        n = min(len(request.spec_token_ids), self.k, budget - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            n = min(n, max_tokens - request.num_output_tokens - 1)
        n = min(n, max_model_len - request.num_tokens - 1, kv_capacity_tokens - request.num_tokens - 1)
        return max(n, 0)

    def num_to_propose(self, request: Request, batch_allows: bool) -> int:
        """Proposals to ask the runner for after this step (0: none, the proposer only keeps up).
        A request paused for poor acceptance counts its plain steps down here."""
        state = self._acceptance.get(request.request_id)
        if state is not None and state.paused_steps > 0:
            state.paused_steps -= 1
            return 0
        if not batch_allows or not self.may_speculate(request):
            return 0
        return self.draft_length(request.request_id)

    def draft_length(self, req_id: str) -> int:
        """Proposals worth verifying for this request (see the module docstring); k when the cost is 0."""
        if self.draft_token_cost <= 0:
            return self.k
        glob, own = self._global_rates, self._rates.get(req_id)
        rates, previous = [], FIRST_POSITION_PRIOR
        for i in range(self.k):
            # A position with few verifications leans on the one before it (acceptance rarely drops
            # sharply from one position to the next), so lengths not tried yet are not ruled out.
            prior = (glob.accepted[i] + PRIOR_WEIGHT * previous) / (glob.tested[i] + PRIOR_WEIGHT)
            if own is not None:
                prior = (own.accepted[i] + PRIOR_WEIGHT * prior) / (own.tested[i] + PRIOR_WEIGHT)
            rates.append(prior)
            previous = prior
        n = best_draft_length(rates, self.draft_token_cost)
        if n > 0:
            self._idle_steps.pop(req_id, None)
            return n
        idle = self._idle_steps.get(req_id, 0) + 1
        self._idle_steps[req_id] = idle % PROBE_EVERY
        return 1 if idle >= PROBE_EVERY else 0

    # -- after a step ---------------------------------------------------------------
    def record(self, request: Request, num_drafted: int, num_emitted: int) -> int:
        """Counts one verification row; returns how many of its proposals were rejected."""
        accepted = max(min(num_emitted - 1, num_drafted), 0)
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += accepted
        for position in range(accepted):
            stats.accepted_per_position[position] += 1
        if self.draft_token_cost > 0 and num_drafted > 0:
            self._global_rates.add(num_drafted, accepted)
            rates = self._rates.get(request.request_id)
            if rates is None:
                rates = self._rates[request.request_id] = _PositionRates(self.k)
            rates.add(num_drafted, accepted, DECAY)
        if self.min_acceptance_rate > 0:
            self._track(request.request_id, num_drafted, accepted)
        return num_drafted - accepted

    def _track(self, req_id: str, drafted: int, accepted: int) -> None:
        state = self._acceptance.setdefault(req_id, _Acceptance())
        state.window.append((drafted, accepted))
        state.proposed += drafted
        state.accepted += accepted
        while state.window and state.proposed - state.window[0][0] >= self.acceptance_window:
            old_drafted, old_accepted = state.window.popleft()
            state.proposed -= old_drafted
            state.accepted -= old_accepted
        if state.proposed >= self.acceptance_window and state.accepted < self.min_acceptance_rate * state.proposed:
            # Poor acceptance: decode plainly for a while, then measure afresh.
            state.window.clear()
            state.proposed = state.accepted = 0
            state.paused_steps = self.acceptance_window

    def forget(self, req_id: str) -> None:
        self._acceptance.pop(req_id, None)
        self._rates.pop(req_id, None)
        self._idle_steps.pop(req_id, None)
