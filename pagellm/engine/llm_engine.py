"""LLMEngine: the synchronous step loop (front end + engine core in one process).

    add_request(...)   the shared intake (validate + tokenize once, fan out n > 1), then the core
    step()             one core step, then detokenize / stop strings / RequestOutputs
    abort_request(id)  frees everything the request holds
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

from pagellm.config import EngineConfig
from pagellm.engine.core import EngineCore
from pagellm.engine.core_interface import admit_all_or_none
from pagellm.engine.intake import PreparedRequest, RequestIntake, fan_out, load_front_end_tokenizer  # noqa: F401
from pagellm.engine.output_processor import OutputKind
from pagellm.engine.processor import PromptType
from pagellm.engine.setup import ModelSetup, resolve_setup
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, quiet: bool = False) -> None:
        if config.data_parallel_size > 1:
            # As in vLLM, offline inference is one engine core; several cores need a router in front.
            raise ValueError(f"EngineConfig.data_parallel_size: the offline LLM runs one engine core, got "
                             f"{config.data_parallel_size}; use `pagellm serve MODEL -dp "
                             f"{config.data_parallel_size}` (or one LLM per device group)")
        self.setup: ModelSetup = resolve_setup(config)
        self.config = self.setup.config
        self.tokenizer = load_front_end_tokenizer(self.setup)
        self.core = EngineCore.from_config(self.setup, quiet=quiet)
        self.intake = RequestIntake(self.config, self.tokenizer, self.setup.model_config)
        self.processor = self.intake.processor
        self.output_processor = self.intake.output_processor

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # -- requests -----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    kind: OutputKind = OutputKind.CUMULATIVE, arrival_time: Optional[float] = None,
                    priority: int = 0, lora_request=None) -> None:
        self.add_prepared(self.intake.prepare(request_id, prompt, params, kind, arrival_time, priority,
                                              lora_request=lora_request))

    def add_prepared(self, prepared: PreparedRequest) -> None:
        """Queues a request `intake.prepare` made (LLM.generate validates a whole batch first this way)."""
        if prepared.request_id in self.output_processor.requests:
            raise ValueError(f"request id {prepared.request_id!r} is already in use")
        admit_all_or_none(prepared.children, self.core.add_request, self.core.abort_requests)
        self.intake.register(prepared)

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
        outputs, stops = self.intake.read_updates(self.core.step())
        self.core.take_first_scheduled()  # queue-time reports are for the async front end's metrics
        for core_id, stop in stops:
            self.core.finish_on_stop_string(core_id, stop)
        return outputs

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached KV block; refused (False) while any request holds blocks."""
        return self.core.reset_prefix_cache()

    def get_tokenizer(self):
        return self.tokenizer

