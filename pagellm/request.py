"""Per-request state shared by the scheduler and the engine (no tensors here)."""

from __future__ import annotations

import enum
import time
from typing import Optional

from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # A step failed because of this request (see Scheduler.isolate_failed_step); the others go on.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_ERROR)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.value if self.finished else None


class Request:
    """One sequence being generated. `num_tokens` = prompt + generated so far.

    The scheduler advances `num_computed_tokens` (tokens whose KV is in the cache); a
    preempted request drops back to 0 and recomputes prompt + outputs later.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: Optional[set[int]] = None,
        arrival_time: Optional[float] = None,
        cache_salt: Optional[str] = None,
        priority: int = 0,
        lora_request=None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids = set(eos_token_ids or ())
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: Optional[float] = None
        # Mixed into prefix-cache hashes: only requests with the same salt share cached blocks
        # (tenant isolation). None shares with every other unsalted request.
        self.cache_salt = cache_salt
        # Prompt tokens found in the prefix cache at first admission (-1: not admitted yet).
        # A request resumed after preemption keeps its first count, as usage reports it.
        self.num_cached_tokens = -1
        # Full-block hashes of this request's tokens, filled lazily by the KV cache manager.
        self.block_hashes: list[bytes] = []
        # Parallel-sampling children reuse each other's prompt blocks even with prefix caching off.
        self.share_prefix = False
        # Lower runs earlier under the "priority" scheduling policy (vLLM's meaning); ignored by "fcfs".
        self.priority = priority
        # Steps that failed with this request in the batch; a suspect runs alone until it has sampled.
        self.num_failed_steps = 0
        self.suspect = False
        self.error: Optional[str] = None  # why it finished with FINISHED_ERROR
        # A pagellm.lora.LoRARequest (None: the base model); its id keys the prefix cache too.
        self.lora_request = lora_request
        # Speculative decoding: the runner's proposals after the last step, for the scheduler to
        # verify in the next one (never part of the outputs until accepted).
        self.spec_token_ids: list[int] = []

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
