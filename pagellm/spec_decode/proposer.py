"""The proposer interface: every speculative method fills the same slot.

A proposer sees each running request's token history (prompt + output so far) and returns up to
k proposed next tokens per request; fewer (or none) is always allowed. Proposers that carry
state between steps (suffix trees, a draft model's KV cache) hear about finished requests.

Methods: "ngram" (pagellm/spec_decode/ngram.py), "draft_model" (draft_model.py: a small model
with its own paged KV cache). Planned behind this interface: "suffix" (suffix trees over the
request and recent requests). EAGLE / MTP heads would be proposers too, fed the target's hidden states; they
need trained heads, so there is no implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence


class Proposer(ABC):
    # True: proposals are single tokens, not draws (q is one-hot for the rejection sampler)
    deterministic: bool = True

    @abstractmethod
    def propose(self, histories: Sequence[Sequence[int]], num_tokens: Sequence[int],
                req_ids: Optional[Sequence[str]] = None) -> list[list[int]]:
        """Up to num_tokens[i] proposals following histories[i], for each request of the step.
        `req_ids[i]` names the request of histories[i], for proposers that keep per-request state
        between steps (None: the call is on its own)."""

    def request_finished(self, req_id: str) -> None:
        """Drops whatever the proposer kept for a finished or aborted request."""
