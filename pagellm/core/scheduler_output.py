"""What the scheduler hands the runner each step, and what it reports upward (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pagellm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: set[int]
    block_ids: list[int]
    num_computed_tokens: int
    lora_request: Optional[Any] = None  # a pagellm.lora.LoRARequest, or None for the base model


@dataclass
class CachedRequestData:
    """A request the runner already tracks: only what changed since the last step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Pipeline parallelism only: output tokens sampled since the request was last scheduled, the
    # last of which is output token num_output_tokens - 1.
    new_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    # Speculative decoding: the request's blocks before `new_block_ids` (None: all it had). Fewer
    # than the runner holds after rejected proposals' blocks went back to the pool.
    num_kept_blocks: Optional[int] = None


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the runner must forget (finished, aborted or preempted since the last step).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs: request id -> row of `grammar_bitmask` (packed int32 allowed-token bits,
    # filled by the engine core for the constrained requests that sample this step).
    grammar_rows: dict[str, int] = field(default_factory=dict)
    grammar_bitmask: Optional[Any] = None
    # Speculative decoding: request id -> proposed tokens scheduled after its last token this step
    # (num_scheduled_tokens counts them: 1 + len(drafts)).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Request id -> how many tokens to propose for it after this step's sampling (absent/0: none).
    num_spec_tokens_to_propose: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RequestUpdate:
    """What one step did to one request, as the engine reports it upward."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    new_logprobs: Optional[object] = None  # per-token logprobs lists, passed through from the runner
    new_prompt_logprobs: Optional[object] = None
    # Prompt tokens served from the prefix cache at first admission (usage's cached_tokens).
    num_cached_tokens: int = 0
    # With finish_reason "error": what failed (for the log and offline callers; servers do not echo it).
    error: Optional[str] = None


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    lora_running: dict = field(default_factory=dict)  # adapter name -> requests (EngineCore fills them)
    lora_waiting: dict = field(default_factory=dict)
    spec_decode: Optional[Any] = None  # a core.spec_scheduling.SpecDecodeStats (copied) with speculation on
