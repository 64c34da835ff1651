"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

from tqdm.auto import tqdm

from pagellm.config import EngineConfig
from pagellm.engine.llm_engine import LLMEngine
from pagellm.engine.output_processor import OutputKind
from pagellm.engine.processor import PromptType
from pagellm.entrypoints.chat_utils import render_chat
from pagellm.lora.request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams


class LLM:
    """Loads a model once and generates for batches of prompts.

    `model` is a Hugging Face directory or a .gguf file (None: the embedded SmolLM2-135M-Instruct);
    every `EngineConfig` field may be passed by name.
    """

    def __init__(self, model: Optional[str] = None, *, quiet: bool = False, **kwargs) -> None:
        unknown = set(kwargs) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {sorted(unknown)}; valid ones: {sorted(EngineConfig.field_names())}")
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs), quiet=quiet)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def reset_prefix_cache(self) -> bool:
        """Empties the prefix cache (later prompts recompute everything); True on success.

        Between `generate` calls no request holds KV blocks, so it succeeds there; it is
        refused (False) only while requests are in flight.
        """
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Generates for one prompt or a list: text, token ids, or dicts {"prompt": text} /
        {"prompt_token_ids": ids}, optionally with "cache_salt": only prompts with the same salt
        share prefix-cache blocks. Each output's `num_cached_tokens` counts the prompt tokens whose
        KV came from the prefix cache. `priority` (one per prompt, lower first) needs
        scheduling_policy="priority". A request whose step failed (and was isolated as the cause)
        comes back with finish_reason "error"; the others are unaffected. `lora_request` (needs
        enable_lora=True): one adapter for every prompt, or one (or None: the base model) per prompt."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts; pass one per prompt")
        loras = _as_lora_list(lora_request, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm, list(priority) if priority is not None else None, loras)

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Optional[dict] = None,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} dicts) or a list of them,
        rendered with the model's chat template (or `chat_template`, a Jinja string)."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this LLM was created with skip_tokenizer_init=True")
        if not messages:
            raise ValueError("no messages given")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = render_chat(tokenizer, conversation, chat_template=chat_template,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            # The template already wrote BOS and friends; don't let the tokenizer add them twice.
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self._run(prompts, _as_params_list(sampling_params, len(prompts)), use_tqdm)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool,
             priorities: Optional[list[int]] = None,
             loras: Optional[list[Optional[LoRARequest]]] = None) -> list[RequestOutput]:
        engine = self.llm_engine
        # Prepare (validate + tokenize, once) everything before anything is queued, so a bad
        # prompt leaves no half-added batch.
        ids = [str(next(self._counter)) for _ in prompts]
        priorities = priorities or [0] * len(prompts)
        loras = loras or [None] * len(prompts)
        prepared = [engine.intake.prepare(request_id, prompt, p, OutputKind.FINAL_ONLY, priority=priority,
                                          lora_request=lora)
                    for request_id, prompt, p, priority, lora in zip(ids, prompts, params, priorities, loras)]
        try:
            for request in prepared:
                engine.add_prepared(request)
            results: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
            with bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            bar.update(1)
                            bar.set_postfix_str(f"{engine.core.num_generation_tokens_total} tokens out", refresh=False)
        except BaseException:
            engine.abort_request([i for i in ids if i in engine.output_processor.requests])
            raise
        return [results[i] for i in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, got {type(prompts).__name__}")


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return params


def _as_lora_list(lora, n: int) -> list[Optional[LoRARequest]]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * n
    loras = list(lora)
    if len(loras) != n:
        raise ValueError(f"got {len(loras)} LoRA requests for {n} prompts; pass one, or one per prompt")
    return loras
