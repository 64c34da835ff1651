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
            child.seed = params.sample_seed(i)
        if i > 0:
            child.prompt_logprobs = None
        children.append(dataclasses.replace(request, request_id=f"{i}_{request.request_id}",
                                            sampling_params=child, share_prefix=True))
    return children


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
                outputs.append(out)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished() or self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # -- the loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        updates = self.core.step()
        outputs, stops = self.output_processor.process(updates)
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
