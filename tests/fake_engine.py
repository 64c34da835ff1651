"""A stand-in for AsyncLLM with the attributes the app reads, whose generate raises a chosen error
(before its first output, or after one): server error paths without a model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

from pagellm.config import EngineConfig


class RaisingEngine:
    def __init__(self, error: BaseException, *, after_first: bool = False, tokenizer=None,
                 vocab_size: int = 100, max_model_len: int = 64) -> None:
        from pagellm.engine.processor import InputProcessor
        from pagellm.lora.registry import LoRARegistry

        self.error = error
        self.after_first = after_first
        self.config = EngineConfig(max_model_len=max_model_len)
        self.tokenizer = tokenizer
        self.model_config = SimpleNamespace(vocab_size=vocab_size, eos_token_id=2)
        self.processor = InputProcessor(self.config, tokenizer, self.model_config)
        self.intake = SimpleNamespace(loras=LoRARegistry(self.config, self.model_config))  # none loaded
        self.metrics = SimpleNamespace(render=lambda: b"", CONTENT_TYPE="text/plain")
        self.errored = False
        self.shut_down = False

    async def prepare(self, prompt, sampling_params, request_id, arrival_time=None, priority: int = 0,
                      lora_request=None):
        self.processor.process(request_id, prompt, sampling_params, priority=priority)  # the real engine's checks
        return prompt

    async def run_off_loop(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    async def generate(self, prompt, sampling_params, request_id, arrival_time=None, *,
                       deadline: Optional[float] = None, priority: int = 0):
        from pagellm.outputs import CompletionOutput, RequestOutput

        if self.after_first:
            yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(0, "a", [5], None, [], None)], False)
        raise self.error

    def shutdown(self) -> None:
        self.shut_down = True


class ScriptedEngine(RaisingEngine):
    """Generates a fixed text, cut into the given chunks (one token id per chunk): the endpoint's
    parsing of model output, without a model. The last prompt it was given is kept in `prompts`."""

    def __init__(self, tokenizer, chunks: list[str], finish_reason: str = "stop") -> None:
        super().__init__(RuntimeError("unused"), tokenizer=tokenizer, vocab_size=len(tokenizer), max_model_len=4096)
        self.chunks = chunks
        self.finish_reason = finish_reason
        self.prompts: list = []

    async def generate(self, prompt, sampling_params, request_id, arrival_time=None, *,
                       deadline: Optional[float] = None, priority: int = 0):
        from pagellm.outputs import CompletionOutput, RequestOutput

        self.prompts.append((prompt, sampling_params))
        n = sampling_params.n
        for i, chunk in enumerate(self.chunks):
            last = i == len(self.chunks) - 1
            outputs = [CompletionOutput(k, chunk, [5], None, None, self.finish_reason if last else None)
                       for k in range(n)]
            yield RequestOutput(request_id, None, list(prompt), outputs, last)
