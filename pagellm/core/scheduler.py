"""Continuous-batching scheduler with a per-step token budget.

Each step: running requests first (in admission order), then waiting ones (FCFS).
Every request is given up to the tokens it still needs (`num_tokens - num_computed_tokens`)
within the step's token budget, so a long prompt is chunked over steps while decodes
and prompt chunks share one batch. When the KV pool runs dry, the most recently
admitted running request is preempted: its blocks are freed and it waits to be
recomputed from scratch (prompt + the tokens it already generated).

Under the "priority" policy both queues are ordered by (priority, arrival time) instead:
lower priority values run first, and the preemption victim is the running request with
the largest key.

With pipeline parallelism (`pipeline_parallel=True`) the engine schedules the next batch while
earlier ones are still in the pipeline, so a step's output is applied after later steps were
scheduled. A request in an in-flight batch is then neither scheduled again nor preempted until
its output is applied, and cached requests carry the tokens sampled since they were last
scheduled (only the last stage samples; the other stages' runners learn the tokens this way).

A step that fails (`isolate_failed_step`) must not take every request down with it: each
request of that batch is preempted and marked a suspect, and suspects then run one per step,
alone, until each has sampled a token. A suspect that fails alone (or, per failed batch, one
request in its second failed step) is finished with FINISHED_ERROR; the others go on.
"""

from __future__ import annotations

import bisect
import copy
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional

from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler_output import (  # noqa: F401 - re-exported: the runner and engine import them here
    CachedRequestData, NewRequestData, RequestUpdate, SchedulerOutput, SchedulerStats)
from pagellm.core.spec_scheduling import SpecScheduling
from pagellm.request import Request, RequestStatus


SCHEDULING_POLICIES = ("fcfs", "priority")


def _priority_key(request: Request) -> tuple[int, float]:
    return request.priority, request.arrival_time


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        is_ready: Optional[Callable[[Request], bool]] = None,
        pipeline_parallel: bool = False,
        lora: Optional[Any] = None,  # a pagellm.lora.admission.LoRAAdmission (caps distinct adapters)
        speculation: Optional[SpecScheduling] = None,  # speculative decoding on (core/spec_scheduling.py)
    ) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {policy!r}")
        self.policy = policy
        # Whether a waiting request may be admitted yet (structured outputs: its grammar is compiled).
        self.is_ready = is_ready
        self.lora = lora
        self.spec = speculation
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()
        # Requests the runner has state for; anything else is sent as NewRequestData.
        self._known_to_runner: set[str] = set()
        # Prompt positions whose logprobs were already passed up; a preempted request recomputes
        # its prompt, and the runner would report them again.
        self._num_prompt_logprobs_sent: dict[str, int] = {}
        # A request may not outgrow the whole pool: it could then never be scheduled again.
        self._kv_capacity_tokens = kv_cache_manager.num_blocks * kv_cache_manager.block_size
        self.num_preemptions_total = 0
        # Requests of a failed step still to be run alone (oldest failure first).
        self._suspects: list[Request] = []
        # request id -> time.monotonic() of its first scheduling, until the engine takes them (queue-time metrics).
        self._first_scheduled: dict[str, float] = {}
        # Pipeline parallelism: requests in batches whose output is not applied yet, and per
        # request the output tokens its runners were sent.
        self.pipeline_parallel = pipeline_parallel
        self._in_flight: set[str] = set()
        self._outputs_sent: dict[str, int] = {}

    # -- intake -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens, more than max_model_len ({self.max_model_len})"
            )
        needed_blocks = -(-min(self.max_model_len, request.num_tokens + 1) // self.kv.block_size)
        if needed_blocks > self.kv.num_blocks:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens but the KV cache only holds "
                f"{self.kv.num_blocks * self.kv.block_size} tokens; raise kv_cache_memory"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        if self.policy == "priority":
            bisect.insort(self.waiting, request, key=_priority_key)
        else:
            self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- the step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted_now = False
        isolating = self._isolate_next_suspect()
        if self.policy == "priority":
            self.running.sort(key=_priority_key)  # the tail is then always the preemption victim
        spec_drafts: dict[str, list[int]] = {}
        speculating = self.spec is not None and self.spec.batch_allows(len(self.running))

        # 1) Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._in_flight and request.request_id in self._in_flight:
                i += 1  # its previous step is still in the pipeline
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute (can't normally happen); keep it running
                i += 1
                continue
            drafts = self._take_drafts(request, num_new, budget) if speculating else []
            request.spec_token_ids = []
            num_new += len(drafts)
            while True:
                new_blocks = self.kv.allocate_slots(request, num_new)
                if new_blocks is not None:
                    break
                victim = self._pop_preemption_victim()
                self._preempt(victim)
                preempted_now = True
                if victim is request:
                    break
            if new_blocks is None:
                break  # the request preempted itself; everything after it is gone too
            num_scheduled[request.request_id] = num_new
            if drafts:
                spec_drafts[request.request_id] = drafts
            budget -= num_new
            cached = CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens)
            if self.spec is not None:
                cached.num_kept_blocks = len(self.kv.get_block_ids(request.request_id)) - len(new_blocks)
            if self.pipeline_parallel:
                sent, outputs = self._outputs_sent[request.request_id], request.output_token_ids
                cached.new_token_ids, cached.num_output_tokens = list(outputs[sent:]), len(outputs)
                self._outputs_sent[request.request_id] = len(outputs)
            cached_reqs.append(cached)
            i += 1

        # 2) Waiting requests, first come first served. Not after a preemption: the pool is full.
        # A suspect being isolated is admitted alone (it was put at the head of the queue).
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_now
               and not (isolating and (self.running or not self.waiting[0].suspect))):
            index = self._next_ready()
            if index is None:
                break  # every waiting request waits for its grammar
            request = self.waiting[index]
            computed_blocks, num_cached_tokens = self.kv.get_computed_blocks(
                request, use_cache=True if request.share_prefix else None)
            num_new = request.num_tokens - num_cached_tokens
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break  # whole prompts only; wait for a step with room
                num_new = budget
            new_blocks = self.kv.allocate_slots(request, num_new, computed_blocks)
            if new_blocks is None:
                break
            del self.waiting[index]
            new_reqs.append(self._start_running(request, num_cached_tokens))
            num_scheduled[request.request_id] = num_new
            budget -= num_new
        out = self._step_output(new_reqs, cached_reqs, num_scheduled)
        if self.spec is not None:
            out.scheduled_spec_decode_tokens = spec_drafts
            # Proposals are verified next step, by the batch as it is after this step's admissions.
            out.num_spec_tokens_to_propose = self._proposal_requests(
                num_scheduled, self.spec.batch_allows(len(self.running)))
        return out

    def _take_drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals to verify after a decoding request's last token this step (see spec_scheduling)."""
        if num_new != 1 or request.num_tokens - request.num_computed_tokens != 1 or not request.spec_token_ids:
            return []  # prefilling or recomputing: proposals are only verified in decode
        if not self.spec.may_speculate(request):
            return []
        n = self.spec.num_drafts(request, budget, self.max_model_len, self._kv_capacity_tokens)
        return request.spec_token_ids[:n]

    def _proposal_requests(self, num_scheduled: dict[str, int], speculating: bool) -> dict[str, int]:
        """Request id -> proposals wanted after this step, for the requests that sample in it."""
        wanted = {}
        for req_id, n in num_scheduled.items():
            request = self.requests[req_id]
            if request.num_computed_tokens + n >= request.num_tokens:
                k = self.spec.num_to_propose(request, speculating)
                if k:
                    wanted[req_id] = k
        return wanted

    def _start_running(self, request: Request, num_cached_tokens: int) -> NewRequestData:
        """Admits a waiting request whose slots are allocated; what the runner needs to know of it."""
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_cached_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached_tokens
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            self._first_scheduled[request.request_id] = request.first_scheduled_time
        self.running.append(request)
        self._known_to_runner.add(request.request_id)
        if self.pipeline_parallel:
            self._outputs_sent[request.request_id] = len(request.output_token_ids)
        return NewRequestData(
            req_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            eos_token_ids=request.eos_token_ids,
            block_ids=list(self.kv.get_block_ids(request.request_id)),
            num_computed_tokens=num_cached_tokens,
            lora_request=request.lora_request,
        )

    def _step_output(self, new_reqs: list[NewRequestData], cached_reqs: list[CachedRequestData],
                     num_scheduled: dict[str, int]) -> SchedulerOutput:
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self._finished_since_last_step,
            preempted_req_ids=self._preempted_since_last_step,
        )
        self._finished_since_last_step = set()
        self._preempted_since_last_step = set()
        if self.pipeline_parallel:
            self._in_flight.update(num_scheduled)
        return out

    def _pop_preemption_victim(self) -> Request:
        """The newest running request not in flight (the one being scheduled at worst)."""
        if not self._in_flight:
            return self.running.pop()
        for j in range(len(self.running) - 1, -1, -1):
            if self.running[j].request_id not in self._in_flight:
                return self.running.pop(j)
        raise AssertionError("every running request is in flight, including the one being scheduled")

    @property
    def has_suspects(self) -> bool:
        """Requests of a failed step wait to be run alone (the pipeline must be empty for that)."""
        return bool(self._suspects)

    def _next_ready(self) -> Optional[int]:
        """The first waiting request that may be admitted: others pass one still compiling its grammar."""
        if self.lora is not None:
            return self.lora.next_admissible(self.waiting, self.running, self.is_ready)
        if self.is_ready is None:
            return 0
        return next((i for i, r in enumerate(self.waiting) if self.is_ready(r)), None)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        if self.policy == "priority":
            bisect.insort(self.waiting, request, key=_priority_key)
        else:
            self.waiting.appendleft(request)
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            self._preempted_since_last_step.add(request.request_id)

    def update_from_output(
        self,
        sched_out: SchedulerOutput,
        sampled_token_ids: dict[str, list[int]],
        logprobs: Optional[dict[str, object]] = None,
        prompt_logprobs: Optional[dict[str, object]] = None,
        spec_token_ids: Optional[dict[str, list[int]]] = None,
    ) -> list[RequestUpdate]:
        """Advances computed counts, appends sampled tokens, applies stop checks, frees finished requests.

        A request that verified proposals gets its accepted ones plus one token; the rejected ones
        are not computed (the count drops by them) and their blocks go back to the pool.
        `spec_token_ids` are the runner's new proposals, kept for the next step."""
        updates: list[RequestUpdate] = []
        logprobs = logprobs or {}
        prompt_logprobs = prompt_logprobs or {}
        spec_token_ids = spec_token_ids or {}
        drafts_of = sched_out.scheduled_spec_decode_tokens
        if self._in_flight:
            self._in_flight.difference_update(sched_out.num_scheduled_tokens)
        for req_id, num_tokens in sched_out.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            new_prompt_logprobs = self._dedup_prompt_logprobs(request, prompt_logprobs.get(req_id))
            sampled = sampled_token_ids.get(req_id, [])
            drafts = drafts_of.get(req_id) if drafts_of else None
            num_rejected = self.spec.record(request, len(drafts), len(sampled)) if drafts else 0
            request.num_computed_tokens += num_tokens - num_rejected
            appended: list[int] = []
            for token_id in sampled:
                request.output_token_ids.append(token_id)
                appended.append(token_id)
                if self._check_stop(request, token_id):
                    break
            if request.suspect and appended:  # it ran alone through a sampling step: not the cause
                self._clear_suspect(request)
            update = RequestUpdate(
                req_id, appended,
                new_logprobs=logprobs.get(req_id), new_prompt_logprobs=new_prompt_logprobs,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
            if request.is_finished:
                update.finish_reason = request.status.finish_reason
                update.stop_reason = request.stop_reason
                self._free_finished(request)
            else:
                if num_rejected:
                    self.kv.free_blocks_after(request, request.num_computed_tokens)
                if spec_token_ids:
                    request.spec_token_ids = spec_token_ids.get(req_id, [])
            if appended or update.finish_reason or update.new_prompt_logprobs is not None:
                updates.append(update)
        return updates

    def _dedup_prompt_logprobs(self, request: Request, entries: Optional[list]) -> Optional[list]:
        """Drops prompt-logprob entries (one per position from num_computed_tokens on) already sent."""
        if entries is None:
            return None
        sent = self._num_prompt_logprobs_sent.get(request.request_id, 0)
        start = request.num_computed_tokens
        self._num_prompt_logprobs_sent[request.request_id] = max(sent, start + len(entries))
        return entries[max(0, sent - start):]

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        may_stop = request.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
        elif may_stop and token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
        elif (params.max_tokens is not None and request.num_output_tokens >= params.max_tokens) or (
            request.num_tokens >= self.max_model_len or request.num_tokens > self._kv_capacity_tokens
        ):
            request.status = RequestStatus.FINISHED_LENGTH
        return request.is_finished

    # -- removal --------------------------------------------------------------------
    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        stop_reason: int | str | None = None) -> None:
        """Aborts (or finishes on a stop string) requests, wherever they are; unknown ids are ignored."""
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            request.stop_reason = stop_reason
            self._free_finished(request)

    def _free_finished(self, request: Request) -> None:
        if request.suspect:
            self._clear_suspect(request)
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request)
        self._num_prompt_logprobs_sent.pop(request.request_id, None)
        self._outputs_sent.pop(request.request_id, None)
        if self.spec is not None:
            self.spec.forget(request.request_id)
        request.spec_token_ids = []
        del self.requests[request.request_id]
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            self._finished_since_last_step.add(request.request_id)

    # -- failed steps -----------------------------------------------------------------
    def isolate_failed_step(self, sched_out: SchedulerOutput, error: str) -> list[RequestUpdate]:
        """Handles a step whose execution raised: nothing it computed counts.

        Blocks registered in the prefix cache for that step's tokens are forgotten (their KV
        may be garbage). A request that failed alone is finished with FINISHED_ERROR (blocks
        freed; its update carries the error), and so is, in a batch, the first request already
        in its second failed step; the others are preempted as suspects, to be run one at a
        time. Returns the error updates.
        """
        self._in_flight.difference_update(sched_out.num_scheduled_tokens)
        batch = [self.requests[r] for r in sched_out.num_scheduled_tokens
                 if r in self.requests and self.requests[r].status == RequestStatus.RUNNING]
        for request in batch:
            self.kv.forget_uncomputed_blocks(request)
        updates: list[RequestUpdate] = []
        for request in batch:
            request.num_failed_steps += 1
        # Alone, it is the cause. In a batch, at most one request is blamed per failure: the first that
        # failed before (it passed alone, so the failure needs company); the others are isolated again.
        repeat = next((r for r in batch if r.num_failed_steps >= 2), None)
        for request in batch:
            self.running.remove(request)
            if len(batch) == 1 or request is repeat:
                request.status = RequestStatus.FINISHED_ERROR
                request.error = error
                self._free_finished(request)
                updates.append(RequestUpdate(request.request_id, [], finish_reason="error", error=error))
            else:
                self._preempt(request)
                if not request.suspect:
                    request.suspect = True
                    self._suspects.append(request)
        return updates

    def _isolate_next_suspect(self) -> bool:
        """While suspects remain, the step runs only the oldest one: every other running request
        is preempted and the suspect goes to the head of the queue. Returns whether isolating."""
        if not self._suspects:
            return False
        suspect = self._suspects[0]
        for other in [r for r in self.running if r is not suspect]:
            self.running.remove(other)
            self._preempt(other)
        if suspect.status != RequestStatus.RUNNING:
            self.waiting.remove(suspect)
            self.waiting.appendleft(suspect)
        return True

    def _clear_suspect(self, request: Request) -> None:
        request.suspect = False
        self._suspects.remove(request)
        if self.policy == "priority" and not self._suspects:
            self.waiting = deque(sorted(self.waiting, key=_priority_key))  # isolation moved suspects forward

    def take_first_scheduled(self) -> dict[str, float]:
        """Requests first scheduled since the last call, with when (plain data, for the front end's metrics)."""
        taken, self._first_scheduled = self._first_scheduled, {}
        return taken

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            spec_decode=None if self.spec is None else copy.deepcopy(self.spec.stats),
        )
