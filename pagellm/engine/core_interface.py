"""What the front end sends the engine core and gets back, as plain data.

Kept apart from engine/core.py so the front end (processor, intake, AsyncLLM, the server)
never imports the model runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from pagellm.core.scheduler import RequestUpdate, SchedulerStats  # noqa: F401 - the core's output types
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
