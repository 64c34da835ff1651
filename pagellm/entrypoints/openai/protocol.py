"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests forbid unknown fields, so a misspelt parameter is a 400 naming it rather
than a silently ignored setting. Input is strict: integers and token ids are JSON integers
(`true` is not token id 1, `"5"` is not 5), numbers are finite (no NaN/Infinity, which the
JSON parser refuses too), and ranges are SamplingParams' to check.
Responses follow OpenAI's shapes field for field;
vLLM's extras (`stop_reason`, `max_model_len`, ...) are added where vLLM has them.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_serializer

from pagellm.sampling_params import SamplingParams

# vLLM's default cap on logprobs per position; also OpenAI's limit for chat's top_logprobs.
MAX_LOGPROBS = 20


# Strict scalars for requests: a bool is neither an integer nor a number here.
Int = StrictInt
Float = StrictFloat
TokenId = StrictInt


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ResponseModel(BaseModel):
    """Drops the fields named in `omit_if_none` when they are None (OpenAI leaves them out)."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        data = handler(self)
        if self.omit_if_none:
            data = {k: v for k, v in data.items() if not (k in self.omit_if_none and v is None)}
        return data


def now() -> int:
    return int(time.time())


# -- shared request pieces -------------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class SamplingFields(RequestModel):
    """Sampling fields both endpoints share: OpenAI's, then vLLM's extras (same names as SamplingParams)."""

    n: Int = 1
    temperature: Optional[Float] = None  # None: 1.0, OpenAI's default
    top_p: Optional[Float] = None
    presence_penalty: Optional[Float] = None
    frequency_penalty: Optional[Float] = None
    logit_bias: Optional[dict[str, Float]] = None  # token id (as a JSON key) -> bias
    seed: Optional[Int] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None  # accepted for compatibility; unused
    # vLLM's extra sampling parameters
    top_k: Optional[Int] = None
    min_p: Optional[Float] = None
    repetition_penalty: Optional[Float] = None
    stop_token_ids: Optional[list[TokenId]] = None
    bad_words: Optional[list[str]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: Int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: Optional[list[TokenId]] = None
    prompt_logprobs: Optional[Int] = None
    # vLLM's prefix-cache isolation: only requests with the same salt share cached KV blocks.
    # Not a sampling parameter; the handlers pass it along with the prompt.
    cache_salt: Optional[str] = Field(default=None, min_length=1)
    # vLLM's request priority (lower is served first; needs --scheduling-policy priority). Not a
    # sampling parameter either.
    priority: Int = Field(default=0, ge=-(2**63), lt=2**63)
    # vLLM's constrained decoding: {"json": schema} | {"json_object": true} | {"regex": ...} |
    # {"choice": [...]} | {"grammar": ...} | {"structural_tag": ...}, optionally "disable_any_whitespace".
    structured_outputs: Optional[dict[str, Any]] = None

    def to_sampling_params(self, max_tokens: int, logprobs: Optional[int],
                           prompt_logprobs: Optional[int], constraint: Optional[dict[str, Any]] = None) -> SamplingParams:
        """SamplingParams for one prompt; raises ValueError("SamplingParams.<field>: ...") on bad values.

        `constraint`: structured outputs derived from another field (chat's response_format)."""
        bias = None
        if self.logit_bias is not None:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError(f"SamplingParams.logit_bias: keys must be token ids (integers as strings), "
                                 f"got {list(self.logit_bias)[:5]}") from None
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and value > MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.{name}: at most {MAX_LOGPROBS} per position, got {value}")

        def given(value, default):
            return default if value is None else value

        return SamplingParams(
            n=self.n,
            temperature=given(self.temperature, 1.0),
            top_p=given(self.top_p, 1.0),
            top_k=given(self.top_k, 0),
            min_p=given(self.min_p, 0.0),
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            bad_words=self.bad_words,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=bias,
            allowed_token_ids=self.allowed_token_ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=structured_outputs_params(self.structured_outputs or constraint),
        )


def structured_outputs_params(fields: Optional[dict[str, Any]]):
    if fields is None:
        return None
    from pagellm.structured_output.params import StructuredOutputsParams

    try:
        return StructuredOutputsParams(**fields)
    except TypeError as exc:  # an unknown key
        raise ValueError(f"structured_outputs: {exc}".replace("StructuredOutputsParams.__init__() ", "")) from None


class PromptTokenUsageInfo(ResponseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


# -- /v1/completions ----------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    model: Optional[str] = None
    # A string, a list of strings, token ids, or a list of token-id lists.
    prompt: Union[list[TokenId], list[list[TokenId]], str, list[str]]
    suffix: Optional[str] = None  # rejected: no fill-in-the-middle
    max_tokens: Optional[Int] = None  # None: the rest of the context
    echo: bool = False
    logprobs: Optional[Int] = None
    best_of: Optional[Int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    add_special_tokens: bool = True


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class CompletionStreamResponse(ResponseModel):
    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: Optional[UsageInfo] = None


# -- /v1/chat/completions -------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # non-text parts are rejected with a clear message later
    type: str
    text: Optional[str] = None


class FunctionCallIn(RequestModel):
    name: str
    arguments: str  # JSON text, as the API returned it


class ToolCallIn(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(RequestModel):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None  # an assistant turn that called tools
    tool_call_id: Optional[str] = None  # a tool result answers this call
    reasoning_content: Optional[str] = None  # accepted back from our own responses; not rendered


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(SamplingFields):
    model: Optional[str] = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: Optional[Int] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[Int] = None
    logprobs: bool = False
    top_logprobs: Optional[Int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Accepted so that clients sending the defaults work; anything else is rejected clearly.
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False  # the template already adds what the model needs


class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: Optional[list[ChatCompletionLogProbsContent]] = None


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(ResponseModel):
    omit_if_none = frozenset({"reasoning_content", "tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None  # vLLM's field, with --reasoning-parser
    tool_calls: Optional[list[ToolCallOut]] = None


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class DeltaFunctionCallOut(ResponseModel):
    omit_if_none = frozenset({"name", "arguments"})

    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCallOut(ResponseModel):
    """A tool call's fragment: the first one carries id, type and name, later ones argument text."""

    omit_if_none = frozenset({"id", "type"})

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCallOut


class DeltaMessage(ResponseModel):
    omit_if_none = frozenset({"role", "content", "reasoning_content", "tool_calls"})

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCallOut]] = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionStreamResponse(ResponseModel):
    omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# -- models, tokenizer ------------------------------------------------------------------------
class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "pagellm"
    root: Optional[str] = None
    parent: Optional[str] = None  # a LoRA adapter's base model
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(RequestModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    model: Optional[str] = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(ResponseModel):
    omit_if_none = frozenset({"token_strs"})

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: list[TokenId]


class DetokenizeResponse(ResponseModel):
    prompt: str
