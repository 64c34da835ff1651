"""The request intake both engines share: validate once, tokenize once, fan out n > 1.

    prepare(request_id, prompt, params)  -> PreparedRequest (the core requests + the front-end state)
    admit_all_or_none(children, ...)      (core_interface) adds every child or none
    read_updates(updates)                 -> RequestOutputs, and the stop-string hits to send the core

LLMEngine calls these inline; AsyncLLM runs `prepare` on a bounded thread pool so a big
prompt never blocks its event loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from pagellm.config import EngineConfig
from pagellm.core.scheduler import RequestUpdate
from pagellm.engine.core_interface import EngineCoreRequest
from pagellm.engine.output_processor import OutputKind, OutputProcessor, RequestState
from pagellm.engine.processor import InputProcessor, PromptType
from pagellm.lora.registry import LoRARegistry
from pagellm.lora.request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams


def load_front_end_tokenizer(setup):
    """The tokenizer the front end uses (None with skip_tokenizer_init); `config.tokenizer` overrides the model's."""
    from pagellm.loader import load_tokenizer, resolve_model

    config = setup.config
    if config.skip_tokenizer_init:
        return None
    source = setup.source if config.tokenizer is None else resolve_model(config.tokenizer)
    return load_tokenizer(source, trust_remote_code=config.trust_remote_code)


def fan_out(request: EngineCoreRequest) -> list[EngineCoreRequest]:
    """Splits an n > 1 request into n core requests that share the prompt's KV blocks.

    With a seed, child i uses (seed + i) mod 2**64 so the n samples differ but stay reproducible.
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


@dataclass
class PreparedRequest:
    """A validated, tokenized user request, ready to be registered and sent to the core."""

    state: RequestState
    children: list[EngineCoreRequest]

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def child_ids(self) -> list[str]:
        return [c.request_id for c in self.children]


class RequestIntake:
    """The front end's input and output bookkeeping, shared by LLMEngine and AsyncLLM."""

    def __init__(self, config: EngineConfig, tokenizer, model_config) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = model_config
        self.processor = InputProcessor(config, tokenizer, model_config)
        self._grammar_checker = None  # compiles constraints up front, so a bad one is the caller's error
        self.on_grammar_compile = None  # called with each compile's seconds (AsyncLLM's metrics)
        self.output_processor = OutputProcessor(tokenizer)
        self.loras = LoRARegistry(config, model_config)  # adapters checked before their requests queue

    def prepare(self, request_id: str, prompt: PromptType, params: SamplingParams, kind: OutputKind,
                arrival_time: Optional[float] = None, priority: int = 0,
                lora_request: Optional[LoRARequest] = None) -> PreparedRequest:
        """Validates and tokenizes (once), then fans out; raises ValueError on bad input. Touches no shared state."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        self.loras.check(lora_request)
        text, core_req = self.processor.process(request_id, prompt, params, arrival_time, priority)
        core_req.lora_request = lora_request
        if params.structured_outputs is not None:
            self._check_constraint(params)
        state = RequestState(request_id, text, core_req.prompt_token_ids, core_req.sampling_params, self.tokenizer,
                             kind, core_req.arrival_time)
        return PreparedRequest(state, fan_out(core_req))

    def _check_constraint(self, params: SamplingParams) -> None:
        """Compiles the request's constraint (cached): ValueError naming the problem. The core compiles
        it again for its own matchers; a compile is milliseconds next to a request's generation."""
        if self._grammar_checker is None:
            from pagellm.engine.processor import model_eos_token_ids
            from pagellm.structured_output.manager import StructuredOutputManager, make_backend

            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this engine was started without one")
            eos = sorted(model_eos_token_ids(self.tokenizer, self.model_config))
            backend = make_backend(self.config.structured_outputs_backend, self.tokenizer,
                                   self.model_config.vocab_size, eos)
            self._grammar_checker = StructuredOutputManager(backend, self.model_config.vocab_size, max_workers=1,
                                                            on_compile=self.on_grammar_compile)
        self._grammar_checker.compile(params.structured_outputs)

    def register(self, prepared: PreparedRequest) -> None:
        """Starts tracking the request's outputs; ValueError if its id is in use."""
        if prepared.request_id in self.output_processor.requests:
            raise ValueError(f"request id {prepared.request_id!r} is already in use")
        self.output_processor.add_request(prepared.state, prepared.child_ids,
                                          [c.sampling_params for c in prepared.children])

    def read_updates(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """One core step's updates -> RequestOutputs, and the (core id, stop string) hits the core must hear."""
        return self.output_processor.process(updates)
