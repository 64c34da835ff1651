"""EngineCore: the scheduler and the executor (its workers' model runners), stepping together.

Everything here works on token ids; text lives one level up. This is the part that
runs in its own process under the async server.

With pipeline parallelism the core keeps a batch queue (`_step_with_batch_queue`): up to one
batch per stage in flight, the next batch scheduled while earlier ones run; a step returns the
updates of the oldest batch once it is done. With one stage `step` is the plain synchronous loop.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from pagellm.config import EngineConfig
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler import RequestUpdate, Scheduler, SchedulerOutput, SchedulerStats
from pagellm.core.spec_scheduling import SpecScheduling
from pagellm.request import Request, RequestStatus
from pagellm.engine.core_grammars import CoreGrammars
from pagellm.engine.core_interface import EngineCoreRequest  # noqa: F401 - re-exported
from pagellm.engine.setup import ModelSetup
from pagellm.executor import RankFailure
from pagellm.executor import Executor
from pagellm.lora.admission import LoRAAdmission

if TYPE_CHECKING:
    from pagellm.executor.base import StepFuture
    from pagellm.worker.model_runner import ModelRunner
    from pagellm.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


# Consecutive failed steps after which the core gives up (each failure isolates requests, and a
# request fails at most twice, so a request-caused run of failures stays far below this).
MAX_CONSECUTIVE_FAILED_STEPS = 8


class EngineCore:
    def __init__(self, config: EngineConfig, model_config, executor: Executor, quiet: bool = False,
                 load_tokenizer: Optional[Callable[[], object]] = None) -> None:
        self.config = config
        self.model_config = model_config
        self.executor = executor
        # Structured outputs; the tokenizer they need is loaded at the first constrained request.
        self.grammars = CoreGrammars(config.structured_outputs_backend, model_config, load_tokenizer)
        # Sizes, checks (one max_model_len request must fit) and allocates the KV cache on the workers.
        num_blocks = executor.initialize()
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            policy=config.scheduling_policy,
            is_ready=self.grammars.is_ready,
            pipeline_parallel=executor.max_concurrent_batches > 1,
            lora=LoRAAdmission(config.max_loras) if config.enable_lora else None,
            speculation=SpecScheduling.from_config(config.speculative_config, config.device),
        )
        # Steps in flight (pipeline parallelism only; None: every step is synchronous).
        self._batch_queue_size = executor.max_concurrent_batches
        self._batch_queue: Optional[deque[tuple[SchedulerOutput, StepFuture]]] = \
            deque() if self._batch_queue_size > 1 else None
        self.capacity_tokens = num_blocks * config.block_size
        # Kept so a core running in its own process can hand the line to the front end to print.
        self.kv_cache_summary = executor.kv_cache_summary
        if not quiet:
            print(f"[pagellm] {self.kv_cache_summary}", flush=True)
        self.num_steps = 0
        self.num_generation_tokens_total = 0
        self.num_failed_steps_total = 0
        self._consecutive_failed_steps = 0

    @classmethod
    def from_config(cls, setup: "ModelSetup", quiet: bool = False) -> "EngineCore":
        def load_tokenizer():
            from pagellm.engine.intake import load_front_end_tokenizer

            return load_front_end_tokenizer(setup)

        return cls(setup.config, setup.model_config, Executor.create(setup), quiet=quiet, load_tokenizer=load_tokenizer)

    @property
    def runner(self) -> ModelRunner:
        """The driver worker's model runner (in this process)."""
        return self.executor.driver_worker.model_runner

    def add_request(self, req: EngineCoreRequest) -> Request:
        """Queues the request; returns its scheduler state (read-only to callers, e.g. for queue-time metrics)."""
        request = Request(req.request_id, req.prompt_token_ids, req.sampling_params, req.eos_token_ids,
                          arrival_time=req.arrival_time, cache_salt=req.cache_salt, priority=req.priority,
                          lora_request=req.lora_request)
        request.share_prefix = req.share_prefix
        self.grammars.add(request)  # starts compiling; the scheduler admits it once compiled
        try:
            self.scheduler.add_request(request)
        except ValueError:
            self.grammars.remove([request.request_id])
            raise
        return request

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        self.grammars.remove(request_ids)

    def finish_on_stop_string(self, request_id: str, stop: str) -> None:
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED, stop)
        self.grammars.remove([request_id])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._batch_queue)

    def step(self) -> list[RequestUpdate]:
        if self._batch_queue is not None:
            return self._step_with_batch_queue()
        failed = self.grammars.finish_failed(self.scheduler)
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            # Still let the runner drop state of requests that finished since the last step.
            self.executor.execute(sched_out)
            return failed
        self.grammars.attach_bitmask(sched_out, self.scheduler)
        return failed + self._run_step(sched_out, self.executor.execute)

    def _step_with_batch_queue(self) -> list[RequestUpdate]:
        """Pipeline parallelism: starts a new batch while there is room and something to run;
        otherwise (or with the queue full) waits for the oldest batch and applies its output.

        The scheduler skips requests in flight, so the queued batches are disjoint and each
        request's steps still run one after the other. Suspects of a failed step run alone, so
        the queue drains before they are scheduled."""
        failed = self.grammars.finish_failed(self.scheduler)
        queue = self._batch_queue
        started = False
        if len(queue) < self._batch_queue_size and not (self.scheduler.has_suspects and queue):
            sched_out = self.scheduler.schedule()
            if not sched_out.is_empty:
                self.grammars.attach_bitmask(sched_out, self.scheduler)
                started = True
            if started or sched_out.finished_req_ids or sched_out.preempted_req_ids:
                # An empty one still lets the runners drop state of finished requests, in step order.
                queue.append((sched_out, self.executor.execute_async(sched_out)))
        if not queue or (started and len(queue) < self._batch_queue_size):
            return failed
        sched_out, future = queue.popleft()
        if sched_out.is_empty:
            future.result()
            return failed
        return failed + self._run_step(sched_out, lambda _: future.result())

    def _run_step(self, sched_out: SchedulerOutput,
                  run: Callable[[SchedulerOutput], ModelRunnerOutput]) -> list[RequestUpdate]:
        """Runs (or waits for) one non-empty step and applies its output to the scheduler."""
        try:
            runner_out = run(sched_out)
        except RankFailure:
            raise  # a lost rank is the engine's failure, not a request's: the core dies loudly
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the others
            updates = self._on_failed_step(sched_out, exc)
            self.grammars.remove(u.req_id for u in updates)
            return updates
        self._consecutive_failed_steps = 0
        self.num_steps += 1
        updates = self.scheduler.update_from_output(
            sched_out, runner_out.sampled_token_ids, runner_out.logprobs, runner_out.prompt_logprobs,
            runner_out.spec_token_ids)
        self.grammars.after_step(updates, self.scheduler)
        self.num_generation_tokens_total += sum(len(u.new_token_ids) for u in updates)
        return updates

    def _on_failed_step(self, sched_out, exc: Exception) -> list[RequestUpdate]:
        """The step raised: the scheduler isolates the requests of its batch (see Scheduler.isolate_failed_step).

        Failing steps in a row with no success between them point at the engine, not at a
        request: after MAX_CONSECUTIVE_FAILED_STEPS the error is raised, and the core dies loudly.
        """
        self.num_failed_steps_total += 1
        self._consecutive_failed_steps += 1
        logger.error("engine step failed (%d scheduled requests): %s", len(sched_out.num_scheduled_tokens), exc,
                     exc_info=exc)
        if self._consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise RuntimeError(f"{self._consecutive_failed_steps} engine steps failed in a row") from exc
        return self.scheduler.isolate_failed_step(sched_out, f"{type(exc).__name__}: {exc}")

    def take_first_scheduled(self) -> dict[str, float]:
        return self.scheduler.take_first_scheduled()

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.config.enable_lora:
            stats.lora_running = LoRAAdmission.per_adapter(self.scheduler.running)
            stats.lora_waiting = LoRAAdmission.per_adapter(self.scheduler.waiting)
        return stats

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; refused (False) while any request holds KV blocks."""
        return self.kv.reset_prefix_cache()

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks
