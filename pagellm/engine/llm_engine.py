"""LLMEngine: the synchronous step loop (front end + engine core in one process).

    add_request(...)   validate + tokenize, fan out n > 1, hand to the core
    step()             one core step, then detokenize / stop strings / RequestOutputs
    abort_request(id)  frees everything the request holds
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Optional, Union

from pagellm.config import EngineConfig
from pagellm.engine.core import EngineCore, EngineCoreRequest
from pagellm.engine.output_processor import OutputKind, OutputProcessor, RequestState
from pagellm.engine.processor import InputProcessor, PromptType
from pagellm.engine.setup import ModelSetup, resolve_setup
from pagellm.loader import load_tokenizer
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams


def fan_out(request: EngineCoreRequest) -> list[EngineCoreRequest]:
    """Splits an n > 1 request into n core requests that share the prompt's KV blocks.

    With a seed, child i uses seed + i so the n samples differ but stay reproducible.
    Only child 0 computes prompt logprobs (the prompt is the same for all).
    """
    params = request.sampling_params
    if params.n == 1:
        return [request]
    children = []
    for i in range(params.n):
        child = params.clone()
        child.n = 1
        if params.seed is not None:
            child.seed = params.seed + i
        if i > 0:
            child.prompt_logprobs = None
        children.append(dataclasses.replace(request, request_id=f"{i}_{request.request_id}",
                                            sampling_params=child, share_prefix=True))
    return children


class CachedTokenCounts:
    """Prompt tokens each user request found in the prefix cache, as its core requests report them.

    With n > 1 the smallest count among the children is kept: usage counts the prompt once,
    and a child that computed the prompt means it was not (all) cached.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def note(self, output_processor: OutputProcessor, updates: list) -> None:
        """Call before `output_processor.process(updates)` (which forgets finished requests)."""
        for update in updates:
            entry = output_processor.core_to_completion.get(update.req_id)
            if entry is None:
                continue
            request_id = entry[0].request_id
            seen = self._counts.get(request_id)
            self._counts[request_id] = update.num_cached_tokens if seen is None else min(seen, update.num_cached_tokens)

    def attach(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            out.num_cached_tokens = self._counts.get(out.request_id, 0)
            if out.finished:
                self._counts.pop(out.request_id, None)

    def forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)


class LLMEngine:
    def __init__(self, config: EngineConfig, quiet: bool = False) -> None:
        self.setup: ModelSetup = resolve_setup(config)
        self.config = self.setup.config
        self.tokenizer = None
        if not self.config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(
                self.setup.source if self.config.tokenizer is None else _tokenizer_source(self.config.tokenizer),
                trust_remote_code=self.config.trust_remote_code)
        self.core = EngineCore.from_config(self.setup, quiet=quiet)
        self.processor = InputProcessor(self.config, self.tokenizer, self.setup.model_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._cached_tokens = CachedTokenCounts()

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # -- requests -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    kind: OutputKind = OutputKind.CUMULATIVE, arrival_time: Optional[float] = None) -> None:
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, core_req = self.processor.process(request_id, prompt, params, arrival_time)
        children = fan_out(core_req)
        state = RequestState(request_id, text, core_req.prompt_token_ids, core_req.sampling_params, self.tokenizer,
                             kind, core_req.arrival_time)
        added: list[str] = []
        try:
            for child in children:
                self.core.add_request(child)
                added.append(child.request_id)
        except ValueError:
            self.core.abort_requests(added)
            raise
        self.output_processor.add_request(state, [c.request_id for c in children],
                                          [c.sampling_params for c in children])

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for request_id in ids:
            self.core.abort_requests(self.output_processor.core_ids_of(request_id))
            out = self.output_processor.abort(request_id)
            if out is not None:
                self._cached_tokens.attach([out])
                outputs.append(out)
            self._cached_tokens.forget(request_id)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished() or self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # -- the loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        updates = self.core.step()
        self._cached_tokens.note(self.output_processor, updates)
        outputs, stops = self.output_processor.process(updates)
        self._cached_tokens.attach(outputs)
        for core_id, stop in stops:
            self.core.finish_on_stop_string(core_id, stop)
        return outputs

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached KV block; refused (False) while any request holds blocks."""
        return self.core.reset_prefix_cache()

    def get_tokenizer(self):
        return self.tokenizer


def _tokenizer_source(path: str):
    from pagellm.loader import resolve_model

    return resolve_model(path)
