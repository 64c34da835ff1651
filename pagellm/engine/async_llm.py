"""AsyncLLM: the engine for asyncio servers.

The front end (this object, in the server's process) validates and tokenizes prompts,
detokenizes outputs, finds stop strings and keeps metrics; the engine core (scheduler +
model) runs off the event loop, in a child process by default or in a thread:

    generate() --AddRequest--> core loop --CoreOutputs--> reader thread
                                                            | OutputProcessor (text, stop strings, metrics)
    async for out in generate()  <-- call_soon_threadsafe --+

Each request has its own output stream bound to the event loop that called generate(), so
one engine can serve several loops (tests run one `asyncio.run` per test). Leaving a stream
early (aclose, cancellation, client disconnect) aborts the request in the core.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, TypeVar, Union

from pagellm.config import EngineConfig
from pagellm.core.scheduler import RequestUpdate, SchedulerStats
from pagellm.engine.admission import AdmissionLimits
from pagellm.engine.core_interface import (AbortRequests, AddRequest, CoreOutputs, FinishOnStop, ResetPrefixCache,
                                           StatsRequest)
from pagellm.engine.core_process import ProcessCoreClient, ThreadCoreClient
from pagellm.engine.dp_client import DPCoreClient
from pagellm.engine.dp_router import combine_stats
from pagellm.engine.exceptions import EngineDeadError, EngineOverloadedError, RequestFailedError
from pagellm.engine.async_streams import OutputStream, call_soon, merge_deltas, put_all, resolve, wait_until
from pagellm.engine.intake import PreparedRequest, RequestIntake, load_front_end_tokenizer
from pagellm.engine.metrics import EngineMetrics
from pagellm.engine.output_processor import OutputKind, RequestState
from pagellm.engine.processor import PromptType
from pagellm.engine.setup import ModelSetup, resolve_setup
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

CoreClient = Union[ProcessCoreClient, ThreadCoreClient, DPCoreClient]
T = TypeVar("T")
logger = logging.getLogger(__name__)

# Tokenizing, chat-template rendering and big detokenizations run on this many threads, off the
# event loop. One: a Hugging Face fast tokenizer raises "Already borrowed" when two threads encode
# with the same instance at once; more workers would need a tokenizer copy each.
INTAKE_WORKERS = 1


@dataclass
class _Tracking:
    """Per-request bookkeeping for metrics that the OutputProcessor does not keep."""

    first_token_recorded: bool = False
    num_itl_recorded: int = 0
    first_scheduled_time: Optional[float] = None


class AsyncLLM:
    def __init__(self, setup: ModelSetup, tokenizer, client: CoreClient, model_name: Optional[str] = None,
                 admission: Optional[AdmissionLimits] = None,
                 restart_core: Optional[Callable[[], CoreClient]] = None) -> None:
        """Use `from_config`; this wires up a front end around an already started core client.

        restart_core: when given, a core that dies is replaced by what it returns (a started,
        ready client) instead of leaving the engine dead; requests in flight still fail.
        """
        self.setup = setup
        self.admission = admission or AdmissionLimits()
        self._restart_core = restart_core
        # Called (on the reader thread) once the engine is dead for good, with the reason.
        self._on_dead_callbacks: list[Callable[[str], None]] = []
        self.config: EngineConfig = setup.config
        self.model_config = setup.model_config
        self.tokenizer = tokenizer
        self.intake = RequestIntake(self.config, tokenizer, self.model_config)
        self.processor = self.intake.processor
        self.output_processor = self.intake.output_processor
        self._intake_pool = ThreadPoolExecutor(max_workers=INTAKE_WORKERS, thread_name_prefix="pagellm-intake")
        self.metrics = EngineMetrics(model_name or default_model_name(setup),
                                     num_engines=self.config.data_parallel_size)
        self.intake.on_grammar_compile = self.metrics.record_grammar_compile
        # Guards the OutputProcessor and the tables below: the event loop and the reader thread both use them.
        self._lock = threading.Lock()
        self._streams: dict[str, OutputStream] = {}
        self._tracking: dict[str, _Tracking] = {}
        self._stats: dict[int, SchedulerStats] = {}  # engine core (data-parallel rank) -> its latest snapshot
        # Answers the core owes us (stats snapshots, prefix-cache resets), by request token.
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._tokens = itertools.count()
        self._dead: Optional[str] = None
        self._closed = False
        self._client = client
        client.start_reader(self._on_core_message, self._on_core_exit)

    @classmethod
    def from_config(cls, config: EngineConfig, *, engine_process: bool = True, quiet: bool = False,
                    model_name: Optional[str] = None, admission: Optional[AdmissionLimits] = None,
                    restart_on_failure: bool = False) -> "AsyncLLM":
        """Starts the engine and returns once the model is loaded.

        engine_process: run the core in a child process (default) or in a thread of this one;
        with data_parallel_size > 1, one child process per core (DPCoreClient).
        model_name: the `model_name` label of the metrics (default: the model file/directory name).
        admission: the queue limit (default: none). restart_on_failure: reload a core that dies.
        """
        if config.data_parallel_size > 1 and not engine_process:
            raise ValueError(f"EngineConfig.data_parallel_size: {config.data_parallel_size} engine cores run in "
                             "child processes; engine_process=False (one in-process core) needs 1")
        setup = resolve_setup(config)
        client: Optional[CoreClient] = None
        try:
            if engine_process:
                client = _new_process_client(setup)  # the children load the weights ...
                tokenizer = load_front_end_tokenizer(setup)  # ... while this process loads the tokenizer
                ready = client.wait_ready()
                if not quiet:
                    print(f"[pagellm] {ready.kv_cache_summary}", flush=True)
            else:
                tokenizer = load_front_end_tokenizer(setup)
                client = _start_thread_core(setup, quiet)
        except BaseException:
            if client is not None:
                client.close()
            raise
        restart = None
        if restart_on_failure:
            restart = functools.partial(_start_process_core, setup) if engine_process else \
                functools.partial(_start_thread_core, setup, True)
        return cls(setup, tokenizer, client, model_name, admission, restart)

    # -- requests -----------------------------------------------------------------------
    async def run_off_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Runs CPU-heavy front-end work (tokenizing, chat templates, big decodes) on the bounded intake pool."""
        return await asyncio.get_running_loop().run_in_executor(self._intake_pool,
                                                                functools.partial(fn, *args, **kwargs))

    async def prepare(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str,
                      arrival_time: Optional[float] = None, priority: int = 0, lora_request=None) -> PreparedRequest:
        """Validates and tokenizes off the event loop; ValueError on bad input. Queues nothing."""
        self._check_usable()
        return await self.run_off_loop(self.intake.prepare, request_id, prompt, sampling_params, OutputKind.DELTA,
                                       arrival_time, priority, lora_request)

    async def generate(self, prompt: Union[PromptType, PreparedRequest], sampling_params: Optional[SamplingParams],
                       request_id: Optional[str], arrival_time: Optional[float] = None, *,
                       deadline: Optional[float] = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Streams DELTA outputs (new text / token ids / logprobs) until the request finishes.

        Bad input raises ValueError before the first output; a full queue EngineOverloadedError;
        a dead core EngineDeadError. `arrival_time` and `deadline` are on the time.monotonic()
        clock (default arrival: now); past the deadline the request is aborted and
        RequestTimeoutError raised. `prompt` may be what `prepare` returned (then sampling_params,
        request_id and priority are ignored), so a caller can validate a batch first.
        """
        if isinstance(prompt, PreparedRequest):
            prepared = prompt
        else:
            prepared = await self.prepare(prompt, sampling_params, request_id, arrival_time,  # type: ignore[arg-type]
                                          priority)
        request_id = prepared.request_id
        stream = OutputStream(asyncio.get_running_loop())
        with self._lock:
            self._check_usable()  # again, under the lock: the core may have died while we tokenized
            self._admit(len(prepared.children))
            self.intake.register(prepared)
            constraint = prepared.children[0].sampling_params.structured_outputs
            if constraint is not None:
                self.metrics.record_structured_request(constraint.kind)
            self._streams[request_id] = stream
            self._tracking[request_id] = _Tracking()
        finished = False
        try:
            try:
                self._client.send(AddRequest(request_id, prepared.children))
            except (OSError, ValueError) as e:
                raise EngineDeadError(f"engine core died: {self._dead or e}") from None
            while not finished:
                items = await wait_until(stream.get_all(), deadline, request_id)
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                out = merge_deltas(items)  # type: ignore[arg-type]
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._abort_request(request_id)

    def _admit(self, num_sequences: int) -> None:
        """Admission control (under self._lock): refuses what would overfill the queue."""
        try:
            # Every data-parallel core runs a batch of max_num_seqs.
            self.admission.check(len(self.output_processor.core_to_completion), num_sequences,
                                 self.config.max_num_seqs * self.config.data_parallel_size)
        except EngineOverloadedError:
            self.metrics.record_rejected("queue_full")
            raise

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with a final output whose finish_reason is "abort"."""
        aborted = self._abort_request(request_id)
        if aborted is not None and aborted[1] is not None:
            self._deliver([aborted])

    def _abort_request(self, request_id: str) -> Optional[tuple[OutputStream, Optional[RequestOutput]]]:
        """Forgets the request here and tells the core to free it. Any thread."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return None
            core_ids = self.output_processor.core_ids_of(request_id)
            final = self.output_processor.abort(request_id)
            self._tracking.pop(request_id, None)
            if final is not None:
                self.metrics.record_finished("abort", None, None)
        if core_ids:
            self._send_quietly(AbortRequests(core_ids))
        return stream, final

    # -- stats and state ----------------------------------------------------------------
    def get_stats(self) -> Optional[SchedulerStats]:
        """The latest snapshot the core sent (None before its first step); with data parallelism,
        every core's latest combined (None until each has sent one)."""
        stats = dict(self._stats)
        if len(stats) < self.config.data_parallel_size:
            return None
        return combine_stats(stats[i] for i in sorted(stats))

    async def wait_for_stats(self) -> SchedulerStats:
        """A snapshot the core takes after this call (after everything sent before it, aborts included);
        with data parallelism every core's, combined."""
        return await self._ask_core(StatsRequest)

    async def reset_prefix_cache(self) -> bool:
        """Empties the core's prefix cache; False (nothing changed) while any request holds KV blocks."""
        return await self._ask_core(ResetPrefixCache)

    async def _ask_core(self, message_type):
        """Sends `message_type(token)` and waits for the core's answer under that token."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._check_usable()
            token = next(self._tokens)
            self._waiters[token] = (loop, future)
        try:
            try:
                self._client.send(message_type(token))
            except (OSError, ValueError) as e:
                raise EngineDeadError(f"engine core died: {self._dead or e}") from None
            return await future
        finally:
            with self._lock:
                self._waiters.pop(token, None)

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def is_running(self) -> bool:
        return not self._closed and self._dead is None

    def shutdown(self) -> None:
        """Aborts in-flight requests (their streams end with finish_reason "abort") and stops the core."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            request_ids = list(self._streams)
        finals = []
        for request_id in request_ids:
            aborted = self._abort_request(request_id)
            if aborted is not None and aborted[1] is not None:
                finals.append(aborted)
        self._deliver(finals)
        self._client.close()
        self._intake_pool.shutdown(wait=False, cancel_futures=True)
        self._fail_waiters(RuntimeError("the engine has been shut down"))

    def add_dead_callback(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` runs (on a background thread) when the core dies and will not be restarted."""
        self._on_dead_callbacks.append(callback)

    def _check_usable(self) -> None:
        if self._dead is not None:
            self.metrics.record_rejected("engine_dead")
            raise EngineDeadError(f"engine core died: {self._dead}")
        if self._closed:
            raise RuntimeError("the engine has been shut down")

    # -- the reader thread ------------------------------------------------------------------
    def _on_core_message(self, message: object) -> None:
        if not isinstance(message, CoreOutputs):
            return  # CoreFailed: its message arrives again through _on_core_exit
        deliveries: list[tuple[OutputStream, object]] = []
        with self._lock:
            for request_id, error in message.rejected:
                stream = self._streams.pop(request_id, None)
                self.output_processor.abort(request_id)
                self._tracking.pop(request_id, None)
                if stream is not None:
                    deliveries.append((stream, ValueError(error)))
            self._note_first_scheduled(message.first_scheduled)
            failed = self._failed_requests(message.updates)
            touched: dict[str, tuple[RequestState, int]] = {}
            for update in message.updates:
                entry = self.output_processor.core_to_completion.get(update.req_id)
                if entry is not None and entry[0].request_id not in touched:
                    touched[entry[0].request_id] = (entry[0], entry[0].metrics.num_generation_tokens)
            outputs, stops = self.intake.read_updates(message.updates)
            for state, tokens_before in touched.values():
                self._record_progress(state, tokens_before)
            for out in outputs:
                if out.request_id in failed:
                    continue
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                    self._record_finished(touched[out.request_id][0])
                if stream is not None:
                    deliveries.append((stream, out))
            orphans = self._fail_requests(failed, deliveries)
            answers = [(t, message.stats) for t in message.stats_tokens] + list(message.stats_answers.items())
            answers += message.reset_results
            waiters = [(self._waiters.pop(t), value) for t, value in answers if t in self._waiters]
        if stops:
            self._send_quietly(FinishOnStop(stops))  # first: the core keeps generating until it hears this
        if orphans:
            self._send_quietly(AbortRequests(orphans))  # siblings of a failed sample
        self._stats[message.engine_index] = message.stats
        self.metrics.record_scheduler_stats(message.stats, message.engine_index)
        self._deliver(deliveries)
        for (loop, future), value in waiters:
            call_soon(loop, resolve, future, value, None)

    def _failed_requests(self, updates: list[RequestUpdate]) -> dict[str, str]:
        """User request id -> error, for core requests the core finished with an error this step."""
        failed: dict[str, str] = {}
        for update in updates:
            if update.error is None:
                continue
            entry = self.output_processor.core_to_completion.get(update.req_id)
            if entry is not None:
                failed.setdefault(entry[0].request_id, update.error)
        return failed

    def _fail_requests(self, failed: dict[str, str], deliveries: list) -> list[str]:
        """Ends each failed request with RequestFailedError (under self._lock); returns the core ids of
        its other samples, still running, for the caller to abort."""
        orphans: list[str] = []
        for request_id, error in failed.items():
            logger.error("request %s failed in the engine: %s", request_id, error)
            orphans += self.output_processor.core_ids_of(request_id)
            self.output_processor.abort(request_id)
            self._tracking.pop(request_id, None)
            self.metrics.record_finished("error", None, None)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                deliveries.append((stream, RequestFailedError(f"request {request_id} failed in the engine: {error}")))
        return orphans

    def _note_first_scheduled(self, first_scheduled: dict[str, float]) -> None:
        for core_id, when in first_scheduled.items():
            entry = self.output_processor.core_to_completion.get(core_id)
            tracking = self._tracking.get(entry[0].request_id) if entry is not None else None
            if tracking is not None and (tracking.first_scheduled_time is None or when < tracking.first_scheduled_time):
                tracking.first_scheduled_time = when

    def _record_progress(self, state: RequestState, tokens_before: int) -> None:
        m = state.metrics
        tracking = self._tracking.get(state.request_id)
        self.metrics.record_generation_tokens(m.num_generation_tokens - tokens_before)
        if tracking is None:
            return
        if m.first_token_time is not None and not tracking.first_token_recorded:
            tracking.first_token_recorded = True
            self.metrics.record_first_token(m.first_token_time - m.arrival_time, len(state.prompt_token_ids))
        for latency in m.inter_token_latencies[tracking.num_itl_recorded:]:
            self.metrics.record_inter_token_latency(latency)
        tracking.num_itl_recorded = len(m.inter_token_latencies)

    def _record_finished(self, state: RequestState) -> None:
        m = state.metrics
        tracking = self._tracking.pop(state.request_id, None)
        queue_time = None
        if tracking is not None and tracking.first_scheduled_time is not None:
            queue_time = tracking.first_scheduled_time - m.arrival_time
        e2e = m.finished_time - m.arrival_time if m.finished_time is not None else None
        self.metrics.record_finished(state.completions[0].finish_reason or "abort", e2e, queue_time)

    def _on_core_exit(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return  # an orderly shutdown
            self._dead = reason
            streams = list(self._streams.values())
            for request_id in list(self._streams):
                self.output_processor.abort(request_id)
            self._streams.clear()
            self._tracking.clear()
        logger.error("the engine core died: %s", reason)
        self._deliver([(s, EngineDeadError(f"engine core died: {reason}")) for s in streams])
        self._fail_waiters(EngineDeadError(f"engine core died: {reason}"))
        if self._restart_core is not None:
            threading.Thread(target=self._restart, args=(reason,), name="pagellm-core-restart", daemon=True).start()
        else:
            self._report_dead(reason)

    def _restart(self, reason: str) -> None:
        """Replaces the dead core (in-flight requests have failed); the engine is usable again once it is ready."""
        started = time.monotonic()
        try:
            client = self._restart_core()  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - a core that cannot restart leaves the engine dead
            logger.error("restarting the engine core failed: %s", exc, exc_info=exc)
            self._report_dead(f"{reason}; the restart failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            if self._closed:
                client.close()
                return
            old, self._client = self._client, client
            self._dead = None
        old.close(timeout=1.0)
        client.start_reader(self._on_core_message, self._on_core_exit)
        self.metrics.record_engine_restart()
        logger.warning("the engine core was restarted in %.1f s after: %s", time.monotonic() - started, reason)

    def _report_dead(self, reason: str) -> None:
        for callback in list(self._on_dead_callbacks):
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the others
                logger.exception("engine-dead callback failed")

    def _fail_waiters(self, error: BaseException) -> None:
        with self._lock:
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for loop, future in waiters:
            call_soon(loop, resolve, future, None, error)

    def _send_quietly(self, message: object) -> None:
        """Sends what only matters while the core lives (aborts, stop hits); a dead core has freed everything."""
        try:
            self._client.send(message)
        except (OSError, ValueError):
            pass

    def _deliver(self, items: list[tuple[OutputStream, object]]) -> None:
        """Hands items to their streams, one call per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputStream, object]]] = defaultdict(list)
        for stream, item in items:
            by_loop[stream.loop].append((stream, item))
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, batch in by_loop.items():
            if loop is running:
                put_all(batch)
            else:
                call_soon(loop, put_all, batch)


def _new_process_client(setup: ModelSetup) -> Union[ProcessCoreClient, DPCoreClient]:
    """One core process, or with data parallelism a group of them behind a router."""
    return DPCoreClient(setup) if setup.config.data_parallel_size > 1 else ProcessCoreClient(setup)


def _start_process_core(setup: ModelSetup) -> Union[ProcessCoreClient, DPCoreClient]:
    client = _new_process_client(setup)
    try:
        client.wait_ready()
    except BaseException:
        client.close()
        raise
    return client


def _start_thread_core(setup: ModelSetup, quiet: bool) -> ThreadCoreClient:
    from pagellm.engine.core import EngineCore  # the model stack, only for an in-process core

    return ThreadCoreClient(EngineCore.from_config(setup, quiet=quiet))


def default_model_name(setup: ModelSetup) -> str:
    return os.path.basename(setup.source.path.rstrip(os.sep)).removesuffix(".gguf")
