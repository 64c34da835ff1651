"""The engine core's structured outputs: grammars compiled off the step, one bitmask per step.

    add(request)              compile its constraint in the background (cached by constraint)
    is_ready(request)         the scheduler's admission check: only compiled requests start
    attach_bitmask(sched)     before the step: the allowed-token bits of each constrained row that samples,
                              filled on a thread while the step's forward runs (the runner waits for it)
    after_step(updates)       after it: advance the matchers; a finished grammar ends its request ("stop")

A constraint with `reasoning_end_ids` leaves its rows out of the bitmask until the output has
that sequence (the manager's gate).

The tokenizer (which the core otherwise never needs) and the backend load at the first
constrained request. The runner applies the bitmask to the logits before the sampler, so logprobs
are those of the constrained distribution.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from pagellm.core.scheduler import RequestUpdate, Scheduler, SchedulerOutput
from pagellm.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class CoreGrammars:
    def __init__(self, backend_name: str, model_config, load_tokenizer: Optional[Callable[[], object]]) -> None:
        self.backend_name = backend_name
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size
        self._load_tokenizer = load_tokenizer
        self._manager = None
        self._constrained: set[str] = set()
        # One thread fills the step's bitmask while the forward runs; matchers are touched by one
        # thread at a time: every other use of them first waits for the fill in flight.
        self._fill_pool: Optional[ThreadPoolExecutor] = None
        self._pending_fill = None

    def _get_manager(self):
        if self._manager is None:
            from pagellm.engine.processor import model_eos_token_ids
            from pagellm.structured_output.manager import StructuredOutputManager, make_backend

            tokenizer = self._load_tokenizer() if self._load_tokenizer is not None else None
            if tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this engine has none")
            eos = sorted(model_eos_token_ids(tokenizer, self.model_config))
            backend = make_backend(self.backend_name, tokenizer, self.vocab_size, eos)
            self._manager = StructuredOutputManager(backend, self.vocab_size)
        return self._manager

    def add(self, request: Request) -> None:
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        self._get_manager().submit(request.request_id, params)
        self._constrained.add(request.request_id)

    def is_ready(self, request: Request) -> bool:
        return request.request_id not in self._constrained or self._manager.is_ready(request.request_id)

    def finish_failed(self, scheduler: Scheduler) -> list[RequestUpdate]:
        """Ends the requests whose grammar did not compile (FINISHED_ERROR); their updates carry the error.
        (Front ends compile first and answer 400, so this is for direct callers of the core.)"""
        updates = []
        for request_id in list(self._constrained):
            error = self._manager.error(request_id) if self._manager.is_ready(request_id) else None
            if error is not None:
                scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR)
                updates.append(RequestUpdate(request_id, [], finish_reason="error", error=error))
                self.remove([request_id])
        return updates

    def attach_bitmask(self, sched: SchedulerOutput, scheduler: Scheduler) -> None:
        if not self._constrained:
            return
        rows: dict[str, int] = {}
        for request_id, num_tokens in sched.num_scheduled_tokens.items():
            request = scheduler.requests.get(request_id)
            # Rows still reasoning (before the constraint's reasoning end) sample freely.
            if request_id in self._constrained and request is not None and \
                    request.num_computed_tokens + num_tokens >= request.num_tokens and \
                    self._manager.is_constraining(request_id):
                rows[request_id] = len(rows)
        if rows:
            from pagellm.structured_output.bitmask import fill_in_background

            if self._fill_pool is None:
                self._fill_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagellm-bitmask")
            self._wait_for_fill()
            manager = self._manager
            sched.grammar_rows = rows
            sched.grammar_bitmask = self._pending_fill = fill_in_background(
                self._fill_pool, lambda: manager.fill_bitmask(rows, len(rows)))

    def _wait_for_fill(self) -> None:
        """Waits for the bitmask fill in flight (if any), so nothing else touches a matcher meanwhile.
        Its error, if it failed, is the step's (the runner raised it); it is not raised again here."""
        pending, self._pending_fill = self._pending_fill, None
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - already reported by the step that used it
                pass

    def after_step(self, updates: list[RequestUpdate], scheduler: Scheduler) -> None:
        self._wait_for_fill()
        for update in updates:
            if update.req_id not in self._constrained:
                continue
            if update.finish_reason is None and update.new_token_ids and \
                    self._manager.accept(update.req_id, update.new_token_ids):
                scheduler.finish_requests([update.req_id], RequestStatus.FINISHED_STOPPED)
                update.finish_reason = "stop"
            if update.finish_reason is not None:
                self.remove([update.req_id])

    def remove(self, request_ids: Iterable[str]) -> None:
        self._wait_for_fill()
        for request_id in request_ids:
            if request_id in self._constrained:
                self._constrained.discard(request_id)
                self._manager.remove(request_id)
