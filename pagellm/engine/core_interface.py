"""What the front end sends the engine core and gets back, as plain data (picklable dataclasses).

    front end --(AddRequest / AbortRequests / FinishOnStop / StatsRequest / ResetPrefixCache / Shutdown)--> core loop
    front end <--(CoreReady | CoreStartupFailed, then CoreOutputs per step, CoreFailed)-- core loop

Kept apart from engine/core.py so the front end (processor, intake, AsyncLLM, the server)
never imports the model runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from pagellm.core.scheduler import RequestUpdate, SchedulerStats
from pagellm.sampling_params import SamplingParams

T = TypeVar("T")


@dataclass
class EngineCoreRequest:
    """What the front end sends the core: a fully tokenized, validated request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: set[int] = field(default_factory=set)
    arrival_time: float = field(default_factory=time.monotonic)
    # Parallel-sampling children look up each other's prompt blocks even with prefix caching off.
    share_prefix: bool = False
    # Only requests with the same salt share prefix-cache blocks.
    cache_salt: Optional[str] = None
    # Lower is scheduled earlier under the "priority" policy (vLLM's meaning).
    priority: int = 0
    # A pagellm.lora.LoRARequest (validated by the front end), or None for the base model.
    lora_request: Optional[object] = None


def admit_all_or_none(children: list[EngineCoreRequest], add: Callable[[EngineCoreRequest], T],
                      abort: Callable[[list[str]], None]) -> list[T]:
    """Adds the children of one user request; if any is refused, the ones added are aborted and the error raised."""
    added: list[str] = []
    results: list[T] = []
    try:
        for child in children:
            results.append(add(child))
            added.append(child.request_id)
    except BaseException:
        abort(added)
        raise
    return results


# -- front end -> core --------------------------------------------------------------------
@dataclass
class AddRequest:
    """One user request: its core requests (n > 1 fans out into several), added all or none."""

    request_id: str
    children: list[EngineCoreRequest]


@dataclass
class AbortRequests:
    core_request_ids: list[str]


@dataclass
class FinishOnStop:
    """(core request id, matched stop string) pairs the front end found in the text."""

    stops: list[tuple[str, str]]


@dataclass
class StatsRequest:
    token: int


@dataclass
class ResetPrefixCache:
    """Answered in CoreOutputs.reset_results under the same token."""

    token: int


@dataclass
class Shutdown:
    pass


# -- core -> front end --------------------------------------------------------------------
@dataclass
class CoreReady:
    kv_cache_summary: str
    num_blocks: int


@dataclass
class CoreStartupFailed:
    error: BaseException
    traceback: str


@dataclass
class CoreOutputs:
    """What one loop iteration did: the step's updates and a stats snapshot taken after it."""

    updates: list[RequestUpdate]
    stats: SchedulerStats
    # core request id -> time.monotonic() when it was first scheduled (for queue-time metrics)
    first_scheduled: dict[str, float] = field(default_factory=dict)
    # (user request id, error message) of AddRequests the core refused
    rejected: list[tuple[str, str]] = field(default_factory=list)
    # StatsRequest tokens answered by `stats`
    stats_tokens: list[int] = field(default_factory=list)
    # StatsRequest tokens answered by other snapshots (the data-parallel client: every core's, combined)
    stats_answers: dict[int, SchedulerStats] = field(default_factory=dict)
    # (ResetPrefixCache token, whether the cache was reset)
    reset_results: list[tuple[int, bool]] = field(default_factory=list)
    # user request ids of AddRequests admitted this iteration (the data-parallel router's pending counts)
    added: list[str] = field(default_factory=list)
    # the data-parallel rank of the core that sent this (0 without data parallelism)
    engine_index: int = 0


@dataclass
class CoreFailed:
    message: str
    traceback: str
