"""Admission control of the async front end: how many sequences may wait for a place in the batch.

A request of `n` samples is `n` sequences. The front end admits a request only while the
sequences in flight (queued or running) stay within `max_num_seqs + max_waiting_seqs`; past
that it is refused at once (EngineOverloadedError: HTTP 429 with Retry-After) rather than
queued, so a burst or one huge request cannot grow the queue, or the server's memory, without
bound. The check and the registration happen under one lock, so concurrent requests cannot
overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pagellm.engine.exceptions import EngineOverloadedError

# Beyond a full batch, this many batches' worth of sequences may wait (at least MIN_WAITING_SEQS).
WAITING_BATCHES = 2
MIN_WAITING_SEQS = 256


def default_max_waiting_seqs(max_num_seqs: int) -> int:
    return max(MIN_WAITING_SEQS, WAITING_BATCHES * max_num_seqs)


@dataclass(frozen=True)
class AdmissionLimits:
    """`max_waiting_seqs` None: no limit (the offline default; `pagellm serve` sets one)."""

    max_waiting_seqs: Optional[int] = None
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_waiting_seqs is not None and self.max_waiting_seqs < 0:
            raise ValueError(f"max_waiting_seqs must be >= 0, got {self.max_waiting_seqs}")

    def check(self, num_in_flight: int, num_new: int, max_num_seqs: int) -> None:
        """Raises ValueError when the request could never fit, EngineOverloadedError when it does not fit now."""
        if self.max_waiting_seqs is None:
            return
        capacity = max_num_seqs + self.max_waiting_seqs
        if num_new > capacity:
            raise ValueError(f"the request needs {num_new} sequences (n), more than this server ever queues "
                             f"({capacity}: max_num_seqs + max_waiting_requests)")
        if num_in_flight + num_new > capacity:
            raise EngineOverloadedError(
                f"the server is at capacity ({num_in_flight} sequences queued or running, limit {capacity}); "
                f"retry after {self.retry_after_s} s", self.retry_after_s)
