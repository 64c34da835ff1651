"""Front-end output processing: token ids from the core -> text, logprobs, RequestOutputs.

Stop strings are found here (they need text); a hit is reported back so the caller can
tell the core to finish that request. A request with `n > 1` is fanned out into n core
requests; their outputs are gathered back under the parent's id.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from pagellm.core.scheduler import RequestUpdate
from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from pagellm.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries everything so far
    DELTA = "delta"  # every output carries only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request is done (offline generate)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_generation_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)


class CompletionState:
    """One generated sequence (one core request)."""

    def __init__(self, core_request_id: str, index: int, params: SamplingParams, prompt_token_ids: list[int],
                 tokenizer) -> None:
        self.core_request_id = core_request_id
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer if params.detokenize else None, prompt_token_ids, params)
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[PositionLogprobs]] = [] if params.logprobs is not None else None
        self.cumulative_logprob: Optional[float] = 0.0 if params.logprobs is not None else None
        self.finish_reason: Optional[str] = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.num_sent_tokens = 0
        self.num_sent_logprobs = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, update: RequestUpdate) -> Optional[str]:
        """Takes one step's tokens; returns a stop string if one was matched."""
        stop_hit: Optional[str] = None
        new_ids = update.new_token_ids
        if update.new_logprobs is not None and self.logprobs is not None:
            for ids, lps, rank in update.new_logprobs:
                self.logprobs.append(make_position_logprobs(ids, lps, rank, self.tokenizer))
                self.cumulative_logprob += lps[0]
        if new_ids:
            self.token_ids.extend(new_ids)
            stop_hit = self.detokenizer.update(new_ids)
        if stop_hit is not None:
            self.finish_reason, self.stop_reason = "stop", stop_hit
        elif update.finish_reason is not None:
            self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason
        return stop_hit

    def make_output(self, kind: OutputKind) -> CompletionOutput:
        finished = self.finished
        # Cumulative text is the concatenation of deltas, so held-back text (a possible stop
        # string, a partial UTF-8 character) never shows up early in either mode.
        delta = self.detokenizer.get_delta(finished)
        self.text += delta
        if kind == OutputKind.DELTA:
            token_ids = self.token_ids[self.num_sent_tokens:]
            logprobs = self.logprobs[self.num_sent_logprobs:] if self.logprobs is not None else None
            self.num_sent_tokens = len(self.token_ids)
            self.num_sent_logprobs = len(self.logprobs) if self.logprobs is not None else 0
            text = delta
        else:
            text = self.text
            token_ids, logprobs = list(self.token_ids), (list(self.logprobs) if self.logprobs is not None else None)
        return CompletionOutput(self.index, text, token_ids, self.cumulative_logprob, logprobs,
                                self.finish_reason, self.stop_reason)


def make_position_logprobs(ids: list[int], lps: list[float], rank: int, tokenizer) -> PositionLogprobs:
    """Column 0 is the chosen token (with its true rank); then the top-k by rank."""
    out: PositionLogprobs = {}
    for j, (tid, lp) in enumerate(zip(ids, lps)):
        if j > 0 and tid in out:
            continue  # the chosen token is also among the top-k; keep its entry
        decoded = tokenizer.decode([tid]) if tokenizer is not None else None
        out[tid] = Logprob(lp, rank if j == 0 else j, decoded)
    return out


class RequestState:
    """A user request: its prompt and its n completions."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer, kind: OutputKind, arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.kind = kind
        self.completions: list[CompletionState] = []
        self.prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = (
            [None] if params.prompt_logprobs is not None else None)
        self.metrics = RequestMetrics(arrival_time)
        # Prompt tokens found in the prefix cache. With n > 1 the smallest count among the
        # children: usage counts the prompt once, and a child that computed it was not served.
        self.num_cached_tokens: Optional[int] = None
        self._prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def note_cached_tokens(self, count: int) -> None:
        self.num_cached_tokens = count if self.num_cached_tokens is None else min(self.num_cached_tokens, count)

    def add_prompt_logprobs(self, entries) -> None:
        if self.prompt_logprobs is None or entries is None:
            return
        # Only the first of n children asks for prompt logprobs (the prompt is the same).
        for ids, lps, rank in entries:
            self.prompt_logprobs.append(make_position_logprobs(ids, lps, rank, self.tokenizer))

    def make_output(self, changed: list[CompletionState]) -> Optional[RequestOutput]:
        finished = self.finished
        if self.kind == OutputKind.FINAL_ONLY and not finished:
            return None
        completions = changed if self.kind == OutputKind.DELTA else self.completions
        outputs = [c.make_output(self.kind) for c in completions]
        prompt_logprobs = self.prompt_logprobs
        if self.kind == OutputKind.DELTA:
            if self._prompt_logprobs_sent:
                prompt_logprobs = None
            elif prompt_logprobs is not None and len(prompt_logprobs) >= len(self.prompt_token_ids):
                self._prompt_logprobs_sent = True
            else:
                prompt_logprobs = None
        m = self.metrics
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, finished,
                             prompt_logprobs, metrics={
                                 "arrival_time": m.arrival_time, "first_token_time": m.first_token_time,
                                 "finished_time": m.finished_time,
                                 "num_generation_tokens": m.num_generation_tokens},
                             num_cached_tokens=self.num_cached_tokens or 0)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.core_to_completion: dict[str, tuple[RequestState, CompletionState]] = {}

    def add_request(self, state: RequestState, core_request_ids: list[str], child_params: list[SamplingParams]) -> None:
        for index, (core_id, params) in enumerate(zip(core_request_ids, child_params)):
            completion = CompletionState(core_id, index, params, state.prompt_token_ids, self.tokenizer)
            state.completions.append(completion)
            self.core_to_completion[core_id] = (state, completion)
        self.requests[state.request_id] = state

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def core_ids_of(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return [c.core_request_id for c in state.completions if not c.finished] if state else []

    def process(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the RequestOutputs to hand out and the (core id, stop string) pairs the core must finish."""
        now = time.monotonic()
        changed: dict[str, list[CompletionState]] = {}
        stops: list[tuple[str, str]] = []
        timed: set[str] = set()  # n > 1 siblings stepping together count as one token time
        for update in updates:
            entry = self.core_to_completion.get(update.req_id)
            if entry is None:
                continue
            state, completion = entry
            state.note_cached_tokens(update.num_cached_tokens)
            if completion.finished:
                # An async core may still be stepping a sequence the front end already stopped on a stop string.
                continue
            state.add_prompt_logprobs(update.new_prompt_logprobs)
            m = state.metrics
            m.num_generation_tokens += len(update.new_token_ids)
            if update.new_token_ids and state.request_id not in timed:
                timed.add(state.request_id)
                if m.first_token_time is None:
                    m.first_token_time = now
                elif m.last_token_time is not None:
                    m.inter_token_latencies.append(now - m.last_token_time)
                m.last_token_time = now
            stop = completion.apply(update)
            if stop is not None:
                stops.append((update.req_id, stop))
            changed.setdefault(state.request_id, []).append(completion)
        return self._emit(changed, now), stops

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Marks a user request aborted; returns its final output."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        changed = []
        for c in state.completions:
            if not c.finished:
                c.finish_reason = "abort"
                changed.append(c)
        return self._emit({request_id: changed}, time.monotonic())[0] if changed else None

    def _emit(self, changed: dict[str, list[CompletionState]], now: float) -> list[RequestOutput]:
        outputs = []
        for request_id, completions in changed.items():
            state = self.requests[request_id]
            if state.finished:
                state.metrics.finished_time = now
            out = state.make_output(completions)
            if state.finished:
                del self.requests[request_id]
                for c in state.completions:
                    self.core_to_completion.pop(c.core_request_id, None)
            if out is not None:
                outputs.append(out)
        return outputs
