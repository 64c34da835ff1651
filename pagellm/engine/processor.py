"""Front-end input processing: prompts to validated, tokenized EngineCoreRequests."""

from __future__ import annotations

from typing import Any, Optional, Union

from pagellm.config import EngineConfig
from pagellm.engine.core_interface import EngineCoreRequest
from pagellm.sampling_params import SamplingParams

# A prompt: text, token ids, or vLLM-style dicts {"prompt": ...} / {"prompt_token_ids": [...]},
# which may also carry a "cache_salt" (only prompts with the same salt share prefix-cache blocks).
PromptType = Union[str, list[int], dict[str, Any]]

_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


def prompt_cache_salt(prompt: PromptType) -> Optional[str]:
    """The prompt's cache_salt (None when it has none); raises ValueError unless it is a non-empty string."""
    if not isinstance(prompt, dict) or prompt.get("cache_salt") is None:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def model_eos_token_ids(tokenizer, model_config) -> set[int]:
    """EOS ids from the tokenizer and the model config (which may list several)."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
                   getattr(model_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer, model_config) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = model_eos_token_ids(tokenizer, model_config)

    def split_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """(prompt text or None, prompt token ids)."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - _PROMPT_KEYS
            if unknown:
                raise ValueError(f"unknown prompt fields {sorted(unknown)}; a dict prompt may have {sorted(_PROMPT_KEYS)}")
            if "prompt_token_ids" in prompt:
                text, (_, ids) = prompt.get("prompt"), self.split_prompt(list(prompt["prompt_token_ids"]))
                return text, ids
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this engine was started with skip_tokenizer_init=True, "
                                 "so pass token ids instead")
            if prompt == "":
                raise ValueError("the prompt is empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise ValueError("token-id prompts must be lists of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            return None, ids
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}; pass a string or a list of token ids")

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams,
                arrival_time: Optional[float] = None, priority: int = 0) -> tuple[Optional[str], EngineCoreRequest]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        self._check_priority(priority)
        text, ids = self.split_prompt(prompt)
        cache_salt = prompt_cache_salt(prompt)
        if not ids:
            raise ValueError("the prompt is empty (it tokenized to zero tokens)")
        max_len = self.config.max_model_len
        if len(ids) > max_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long, more than max_model_len ({max_len}); "
                             "shorten it or raise max_model_len")
        if len(ids) == max_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long and fills max_model_len ({max_len}), "
                             "leaving no room to generate")
        params.validate_vocab(self.vocab_size)
        if (params.prompt_logprobs or params.logprobs) and max(params.prompt_logprobs or 0, params.logprobs or 0) > self.vocab_size:
            raise ValueError(f"logprobs may not exceed the vocabulary size ({self.vocab_size})")
        if params.bad_words:
            params = params.clone()
            params.bad_words_token_ids = self._bad_words_ids(params.bad_words)
        req = EngineCoreRequest(request_id, ids, params, set(self.eos_token_ids), cache_salt=cache_salt,
                                priority=priority)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        return text, req

    def _check_priority(self, priority: int) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not -2**63 <= priority < 2**63:
            raise ValueError(f"priority must be a 64-bit integer, got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy "
                             "(--scheduling-policy priority); this engine schedules first come, first served")

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word as token ids, both as written and with a leading space (as it would appear mid-text)."""
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer")
        out: list[list[int]] = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out
