"""What the engine raises to its callers when a request cannot be served, beyond bad input (ValueError).

Servers map each to its own status (docs/architecture.md, "Serving: limits and errors"). All
are RuntimeErrors, so callers that only know "the engine failed" still catch them.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine core has stopped (crashed, killed, or restarting); nothing can be served now."""


class EngineOverloadedError(RuntimeError):
    """Admission control refused the request: the queue is full. Retrying later may succeed."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailedError(RuntimeError):
    """The engine finished this request with an error (a step failed, and it was isolated as the
    cause); the engine itself goes on. The message is for the log, not for remote clients."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline and was aborted (everything it held is freed)."""
