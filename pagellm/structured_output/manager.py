"""The engine core's side of structured outputs: compile off the step, one matcher per request,
one bitmask per step.

    submit(request_id, params)        compile (cached by constraint) on a small thread pool
    is_ready(request_id)              the scheduler admits a constrained request only once it is
    fill_bitmask(rows)                packed int32 mask for the rows that sample this step
    accept(request_id, tokens)        advance after sampling; says whether the grammar finished

A preempted request keeps its generated tokens (only its KV is recomputed), so its matcher
stays as it is.

A request with `reasoning_end_ids` starts behind a gate: `is_constraining` is False, its rows are
left out of the bitmask and its tokens are not given to the matcher, until the output contains
that sequence; the tokens after it are the matcher's first.

A constraint that fails to compile makes `error(request_id)` return the message; the engine
finishes that request with an error (the front end compiles first too, so users get a 400).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from pagellm.structured_output.backend import GrammarBackend, Matcher, allocate_bitmask
from pagellm.structured_output.params import StructuredOutputsParams

BACKENDS = ("auto", "xgrammar", "guidance")
COMPILE_CACHE_SIZE = 256


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    if name == "auto":
        from pagellm.structured_output.auto_backend import AutoBackend

        return AutoBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "xgrammar":
        from pagellm.structured_output.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "guidance":
        from pagellm.structured_output.guidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"unknown structured-outputs backend {name!r}; available: {', '.join(BACKENDS)}")


@dataclass
class _Entry:
    future: Future
    matcher: Optional[Matcher] = None
    error: Optional[str] = None
    gate: Optional[list[int]] = None  # reasoning end ids not yet seen in the output
    tail: Optional[list[int]] = None  # the output's last tokens while gated (a gate may span tokens)


class StructuredOutputManager:
    def __init__(self, backend: GrammarBackend, vocab_size: int, max_workers: int = 2,
                 on_compile: Optional[Callable[[float], None]] = None) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pagellm-grammar")
        self._lock = threading.Lock()  # guards the compile cache (filled from pool threads)
        self._compiled: OrderedDict[tuple, Future] = OrderedDict()
        self._requests: dict[str, _Entry] = {}
        self.num_compiles = 0  # cache misses
        self._on_compile = on_compile  # seconds of each compile (the metrics' histogram)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compiles now (front-end validation); ValueError naming the problem."""
        return self._compiled_future(params).result()

    def submit(self, request_id: str, params: StructuredOutputsParams) -> None:
        self._requests[request_id] = _Entry(self._compiled_future(params), gate=params.reasoning_end_ids, tail=[])

    def _compiled_future(self, params: StructuredOutputsParams) -> Future:
        key = params.cache_key()
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
            future = self._pool.submit(self._timed_compile, params)
            self._compiled[key] = future
            while len(self._compiled) > COMPILE_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return future

    def _timed_compile(self, params: StructuredOutputsParams) -> Any:
        import time

        start = time.perf_counter()
        try:
            return self.backend.compile(params)
        finally:
            self.num_compiles += 1
            if self._on_compile is not None:
                self._on_compile(time.perf_counter() - start)

    def is_ready(self, request_id: str) -> bool:
        """Compiled (or failed: then `error` says why). Builds the request's matcher on first sight."""
        entry = self._requests[request_id]
        if entry.matcher is not None or entry.error is not None:
            return True
        if not entry.future.done():
            return False
        try:
            entry.matcher = self.backend.matcher(entry.future.result())
        except ValueError as exc:
            entry.error = str(exc)
        return True

    def error(self, request_id: str) -> Optional[str]:
        entry = self._requests.get(request_id)
        return entry.error if entry is not None else None

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def is_constraining(self, request_id: str) -> bool:
        """False while the request is still reasoning (its output is free)."""
        return self._requests[request_id].gate is None

    def fill_bitmask(self, rows: dict[str, int], num_rows: int) -> torch.Tensor:
        """[num_rows, words] mask; rows of requests without a grammar allow everything."""
        bitmask = allocate_bitmask(num_rows, self.vocab_size)
        for request_id, row in rows.items():
            self._requests[request_id].matcher.fill_bitmask(bitmask, row)
        return bitmask

    def accept(self, request_id: str, token_ids: list[int]) -> bool:
        """Advances the matcher; True when the grammar is complete. A token the grammar refuses
        (it cannot happen under the mask, except for EOS handling differences) ends it too."""
        entry = self._requests[request_id]
        if entry.gate is not None:
            token_ids = _past_gate(entry, token_ids)
        matcher = entry.matcher
        for token_id in token_ids:
            if not matcher.accept_token(token_id):
                return True
        return bool(token_ids) and matcher.is_terminated()

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _past_gate(entry: _Entry, token_ids: list[int]) -> list[int]:
    """The tokens after the gate's sequence (opening the gate), or [] while it is not yet seen."""
    gate = entry.gate
    start = max(0, len(entry.tail) - len(gate) + 1)  # a match must end in the new tokens
    tail = entry.tail[start:] + list(token_ids)
    for i in range(len(tail) - len(gate) + 1):
        if tail[i:i + len(gate)] == gate:
            entry.gate, entry.tail = None, None
            return tail[i + len(gate):]
    entry.tail = tail[-(len(gate) - 1):] if len(gate) > 1 else []
    return []
