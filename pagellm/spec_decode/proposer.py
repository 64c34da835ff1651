"""The proposer interface: every speculative method fills the same slot.

A proposer sees each running request's token history (prompt + output so far) and returns up to
k proposed next tokens per request; fewer (or none) is always allowed. Proposers that carry
state between steps (suffix trees, a draft model's KV cache) hear about finished requests.

Stateful proposers need to know which request a history belongs to, so `propose` also takes
`req_ids` (one id per history, the scheduler's request ids) and `prompt_lens` (how many tokens of
each history are the prompt), both optional keywords: stateless proposers ignore them, stateful
ones say when they need them. Callers should always pass both.

Methods: "ngram" (pagellm/spec_decode/ngram.py: stateless) and "suffix"
(pagellm/spec_decode/suffix.py: tries over the request and recent requests; needs `req_ids`).
"draft_model" (pagellm/spec_decode/draft_model.py: a small model with its own paged KV cache;
uses `req_ids` to keep that cache between steps).
EAGLE / MTP heads would be proposers too, fed the target's hidden states; they need trained
heads, so there is no implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence


class Proposer(ABC):
    # True: proposals are single tokens, not draws (q is one-hot for the rejection sampler)
    deterministic: bool = True
    # False: proposals depend on the history alone, so the runner may skip requests asking for none
    stateful: bool = True

    @abstractmethod
    def propose(self, histories: Sequence[Sequence[int]], num_tokens: Sequence[int],
                req_ids: Optional[Sequence[str]] = None,
                prompt_lens: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Up to num_tokens[i] proposals following histories[i], for each request of the step.

        histories[i] is request req_ids[i]'s prompt and accepted outputs (its first
        prompt_lens[i] tokens are the prompt); num_tokens[i] == 0 asks for nothing but lets a
        stateful proposer keep up with the history."""

    def request_finished(self, req_id: str) -> None:
        """Drops whatever the proposer kept for a finished or aborted request."""
