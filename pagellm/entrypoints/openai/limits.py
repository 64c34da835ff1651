"""Per-request size limits the server checks before any tokenizing or queueing.

Each limit bounds what one request may cost the server (CPU on the event loop, memory in
the front end or the engine core). Defaults and the reasons for them are in
docs/architecture.md ("Serving: limits and errors").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pagellm.entrypoints.openai.errors import OpenAIError

# No tokenizer we know of needs more than this many characters for one token, so a prompt
# longer than this many characters per context token cannot fit the context anyway.
CHARS_PER_TOKEN_BOUND = 32
# (prompt tokens) x (logprobs per position + 1) a prompt-logprobs request may ask for: 6,241
# prompt tokens at 20 logprobs, or all of a 64k prompt at 1. Each entry is a Python object in
# the front end and a row in the core's output.
DEFAULT_PROMPT_LOGPROBS_BUDGET = 1 << 17
DEFAULT_MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is n sequences)
DEFAULT_MAX_N = 128  # samples per prompt: OpenAI's own limit


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_chars: int
    max_chat_messages: int
    max_prompts: int = DEFAULT_MAX_PROMPTS
    prompt_logprobs_budget: int = DEFAULT_PROMPT_LOGPROBS_BUDGET
    max_n: int = DEFAULT_MAX_N
    # Seconds a request may take from arrival to its last token; None: no deadline.
    request_timeout_s: Optional[float] = None

    @classmethod
    def for_context(cls, max_model_len: int, *, max_prompt_chars: Optional[int] = None,
                    max_chat_messages: Optional[int] = None, max_prompts: Optional[int] = None,
                    prompt_logprobs_budget: Optional[int] = None, max_n: Optional[int] = None,
                    request_timeout_s: Optional[float] = None) -> "ServerLimits":
        """Limits for a `max_model_len` context; None takes the derived default."""
        limits = cls(
            max_prompt_chars=max_prompt_chars or CHARS_PER_TOKEN_BOUND * max_model_len,
            # Every message costs at least one token of context (its role marker).
            max_chat_messages=max_chat_messages or max_model_len,
            max_prompts=max_prompts or DEFAULT_MAX_PROMPTS,
            prompt_logprobs_budget=prompt_logprobs_budget or DEFAULT_PROMPT_LOGPROBS_BUDGET,
            max_n=max_n or DEFAULT_MAX_N, request_timeout_s=request_timeout_s)
        for name, value in vars(limits).items():
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if limits.max_n > DEFAULT_MAX_N:
            raise ValueError(f"max_n may be at most {DEFAULT_MAX_N} (OpenAI's limit), got {limits.max_n}")
        return limits

    def deadline(self, arrival: float) -> Optional[float]:
        """The time.monotonic() by which a request that arrived at `arrival` must be done."""
        return None if self.request_timeout_s is None else arrival + self.request_timeout_s

    # -- checks ---------------------------------------------------------------------------
    def check_text(self, length: int, param: str) -> None:
        if length > self.max_prompt_chars:
            raise OpenAIError(f"{param} is {length} characters long, more than this server's limit of "
                              f"{self.max_prompt_chars} (--max-prompt-chars)", 400, param=param,
                              code="prompt_too_long")

    def check_messages(self, count: int, total_chars: int) -> None:
        if count > self.max_chat_messages:
            raise OpenAIError(f"the conversation has {count} messages, more than this server's limit of "
                              f"{self.max_chat_messages} (--max-chat-messages)", 400, param="messages",
                              code="too_many_messages")
        self.check_text(total_chars, "messages")

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise OpenAIError(f"n is {n}, more than this server's limit of {self.max_n} (--max-n)", 400, param="n",
                              code="invalid_value")

    def check_prompt_count(self, count: int) -> None:
        if count > self.max_prompts:
            raise OpenAIError(f"the request has {count} prompts, more than this server's limit of "
                              f"{self.max_prompts} (--max-prompts-per-request)", 400, param="prompt",
                              code="too_many_prompts")

    def check_prompt_logprobs(self, prompt_lengths: list[int], per_position: Optional[int], param: str) -> None:
        """Prompt logprobs cost (tokens x (k + 1)) entries: the chosen token is always listed."""
        if per_position is None:
            return
        entries = sum(prompt_lengths) * (per_position + 1)
        if entries > self.prompt_logprobs_budget:
            raise OpenAIError(
                f"prompt logprobs for {sum(prompt_lengths)} prompt tokens at {per_position} per position need "
                f"{entries} entries, more than this server's budget of {self.prompt_logprobs_budget} "
                "(--prompt-logprobs-budget); shorten the prompt or ask for fewer logprobs", 400, param=param,
                code="prompt_logprobs_budget_exceeded")
