"""POST /v1/chat/completions: messages -> chat template -> prompt ids -> assistant message(s).

Templates come from a --chat-template file or the tokenizer, and render through
`chat_utils.render_chat` (transformers' renderer, in Jinja2's immutable sandbox), the same
path as `LLM.chat`, so the server and the offline API see identical prompts.
"""

from __future__ import annotations

import dataclasses
import json
import time

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, AsyncIterator, Optional

from fastapi.responses import JSONResponse, StreamingResponse

from pagellm.entrypoints.chat_utils import render_chat
from pagellm.entrypoints.openai.chat_output import ChoiceOutputParser
from pagellm.entrypoints.openai.chat_tools import ToolSetup, response_format_constraint, tool_message_fields, tool_setup
from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.forced_tool_calls import function_parameters
from pagellm.entrypoints.openai.limits import ServerLimits
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessageIn,
    ChatMessageOut,
    DeltaFunctionCallOut,
    DeltaMessage,
    DeltaToolCallOut,
    FunctionCallOut,
    PromptTokenUsageInfo,
    ToolCallOut,
    UsageInfo,
    now,
)
from pagellm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    clamp_logprob,
    random_id,
    sse,
    sse_error,
    start_stream,
)
from pagellm.entrypoints.openai.parsed_output import DeltaMessage as ParsedDelta
from pagellm.entrypoints.openai.reasoning import ReasoningParser
from pagellm.entrypoints.openai.tool_parsers import ToolParser
from pagellm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pagellm.sampling_params import SamplingParams

# Arguments of the renderer itself; template variables with these names would change how it
# runs (tokenize=True returns ids, not text) rather than what the template sees.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "chat_template", "tokenize", "add_generation_prompt", "continue_final_message",
    "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
    "tokenizer_kwargs", "tools", "documents"})


def tokenizer_chat_template(tokenizer) -> Optional[str]:
    """The tokenizer's template; a dict of named templates uses the "default" one."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def message_dicts(messages: list[ChatMessageIn]) -> list[dict[str, Any]]:
    """Messages as templates expect them: text content, parts joined with newlines."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(f"messages[{i}] has a content part of type {part.type!r}; this server "
                                      "accepts text parts only", 400, param=f"messages.{i}.content",
                                      code="unsupported_content_type")
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
        if message.name is not None:
            entry["name"] = message.name
        entry.update(tool_message_fields(message))
        out.append(entry)
    return out


# -- the endpoint --------------------------------------------------------------------------------
@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[ChatCompletionLogProbsContent] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    parser: Optional[ChoiceOutputParser] = None  # reasoning / tool calls, when either is on


class OpenAIServingChat(OpenAIServing):
    param_names = MappingProxyType({"logprobs": "top_logprobs"})  # chat's top_logprobs is SamplingParams.logprobs
    prompt_param = "messages"
    def __init__(self, engine, served_model_name: str, chat_template: Optional[str] = None,
                 limits: Optional[ServerLimits] = None, *, tool_parser: Optional[type[ToolParser]] = None,
                 enable_auto_tool_choice: bool = False,
                 reasoning_parser: Optional[type[ReasoningParser]] = None) -> None:
        super().__init__(engine, served_model_name, limits)
        self.template: Optional[str] = chat_template or tokenizer_chat_template(self.tokenizer)
        self.tool_parser = tool_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.reasoning_parser = reasoning_parser(self.tokenizer) if reasoning_parser is not None else None

    def render_prompt(self, messages: list[ChatMessageIn], add_generation_prompt: bool,
                      continue_final_message: bool, extra: Optional[dict[str, Any]],
                      tools: Optional[list[dict[str, Any]]] = None) -> str:
        if self.template is None:
            raise OpenAIError(f"the model `{self.model_name}` has no chat template; start the server with "
                              "--chat-template FILE, or use /v1/completions", 400, param="messages",
                              code="no_chat_template")
        if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
            raise OpenAIError("continue_final_message needs add_generation_prompt=false and a final assistant "
                              "message", 400, param="continue_final_message", code="invalid_value")
        reserved = sorted(set(extra or {}) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise OpenAIError(f"chat_template_kwargs may not set {reserved}", 400, param="chat_template_kwargs",
                              code="invalid_value")
        dicts = message_dicts(messages)
        # Before rendering: a huge conversation must not cost template time first.
        self.limits.check_messages(len(dicts), sum(len(m["content"]) + len(m.get("name", "")) for m in dicts))
        try:
            kwargs = dict(extra or {}, **({"tools": tools} if tools else {}))
            return render_chat(self.require_tokenizer("chat"), dicts, chat_template=self.template,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, **kwargs)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param="messages", code="invalid_value") from None

    async def create(self, request: ChatCompletionRequest):
        arrival = time.monotonic()
        lora = self.check_model(request.model)
        self._reject_unsupported(request)
        tools = tool_setup(request, self.tool_parser, self.enable_auto_tool_choice, self.require_tokenizer("chat"))
        text = await self.engine.run_off_loop(self.render_prompt, request.messages, request.add_generation_prompt,
                                              request.continue_final_message, request.chat_template_kwargs,
                                              tools.template_tools)
        prompt_ids = await self.encode(text, request.add_special_tokens)
        if request.max_completion_tokens is not None:
            max_tokens = self.max_tokens_for(len(prompt_ids), request.max_completion_tokens, "max_completion_tokens")
        else:
            max_tokens = self.max_tokens_for(len(prompt_ids), request.max_tokens, "max_tokens")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        self.limits.check_prompt_logprobs([len(prompt_ids)], request.prompt_logprobs, "prompt_logprobs")
        params = self.build_params(request, max_tokens, logprobs, request.prompt_logprobs,
                                   tools.constraint or response_format_constraint(request))
        if tools.parser is not None and tools.parser.needs_special_tokens:
            params = params.clone()
            params.skip_special_tokens = False  # the parser must see its markers ([TOOL_CALLS], <|python_tag|>)
        params = self._constrain_after_reasoning(params, text)
        request_id = random_id("chatcmpl")
        prepared = await self._prepare(request_id, prompt_ids, request, params, tools, lora)
        try:
            outputs = await start_stream(self.generate(prepared, params, request_id, arrival))
        except ValueError as exc:
            raise self.bad_value(exc) from None
        run = _Run(self, request, request_id, len(prompt_ids), tools)
        if request.stream:
            return StreamingResponse(run.stream(outputs), media_type="text/event-stream")
        return JSONResponse((await run.collect(outputs)).model_dump())

    def _constrain_after_reasoning(self, params: SamplingParams, prompt: str) -> SamplingParams:
        """Under --reasoning-parser, a constraint starts after the reasoning's closing tag (unless the
        prompt already closed it): the thinking is free text, the answer follows the grammar."""
        constraint, parser = params.structured_outputs, self.reasoning_parser
        if constraint is None or parser is None or constraint.reasoning_end_ids is not None or \
                parser.prompt_closes_reasoning(prompt):
            return params
        params = params.clone()
        params.structured_outputs = dataclasses.replace(constraint, reasoning_end_ids=parser.end_ids)
        return params

    async def _prepare(self, request_id: str, prompt_ids: list[int], request: ChatCompletionRequest,
                       params: SamplingParams, tools: ToolSetup, lora=None):
        try:
            return await self.prepare(request_id, prompt_ids, request.cache_salt, params, request.priority, lora)
        except OpenAIError as exc:
            if tools.constraint is None or "does not compile" not in exc.message:
                raise
            raise await self._tool_schema_error(request_id, prompt_ids, request, params, tools, exc) from None

    async def _tool_schema_error(self, request_id: str, prompt_ids: list[int], request: ChatCompletionRequest,
                                 params: SamplingParams, tools: ToolSetup, error: OpenAIError) -> OpenAIError:
        """A forced tool choice whose grammar does not compile: names the function whose parameters
        schema the backend refuses (each one compiled alone; only on this error path)."""
        candidates = [(i, t) for i, t in enumerate(tools.template_tools or [])
                      if tools.named is None or t["function"]["name"] == tools.named]
        for i, tool in candidates:
            probe = params.clone()
            probe.structured_outputs = dataclasses.replace(
                probe.structured_outputs, json=json.dumps(function_parameters(tool)), reasoning_end_ids=None)
            try:
                await self.prepare(request_id, prompt_ids, request.cache_salt, probe, request.priority)
            except OpenAIError as exc:
                name = tool["function"]["name"]
                return OpenAIError(f"the parameters schema of function {name!r} cannot be enforced: {exc.message}",
                                   400, param=f"tools.{i}.function.parameters", code="invalid_value")
        names = [t["function"]["name"] for _, t in candidates]
        return OpenAIError(f"the tools' parameters schemas ({names}) cannot be enforced together for tool_choice "
                           f"\"required\": {error.message}", 400, param="tools", code="invalid_value")

    @staticmethod
    def _reject_unsupported(request: ChatCompletionRequest) -> None:
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed with stream=true", 400, param="stream_options",
                              code="invalid_value")
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", 400, param="top_logprobs", code="invalid_value")


class _Run:
    """One chat request in flight: turns the engine's deltas into OpenAI's chat shapes."""

    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest, request_id: str,
                 prompt_tokens: int, tools: ToolSetup) -> None:
        self.serving = serving
        self.request = request
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.tools = tools
        parsing = serving.reasoning_parser is not None or tools.parser is not None
        self.choices = [_Choice(parser=ChoiceOutputParser(serving.reasoning_parser, tools.parser) if parsing else None)
                        for _ in range(request.n)]
        self.created = now()
        self.num_cached_tokens = 0

    def _take(self, delta: CompletionOutput) -> tuple[Optional[ParsedDelta], Optional[list[ChatCompletionLogProbsContent]]]:
        """Records a delta; returns what of its text to send (parsed when parsing is on) and its logprobs."""
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.num_tokens += len(delta.token_ids)
        logprobs = None
        if self.request.logprobs:
            logprobs = self._logprobs(delta.token_ids, delta.logprobs or [])
            choice.logprobs.extend(logprobs)
        if choice.parser is None:
            parsed = ParsedDelta(content=delta.text) if delta.text else None
        else:
            parsed = choice.parser.feed(delta.text)
            if delta.finish_reason is not None:
                parsed = _joined(parsed, choice.parser.finish())
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if choice.parser is not None and choice.parser.tools_called and delta.finish_reason == "stop":
                choice.finish_reason = self.tools.finish_reason_on_call
        return self._one_call_only(parsed), logprobs

    def _one_call_only(self, parsed: Optional[ParsedDelta]) -> Optional[ParsedDelta]:
        """parallel_tool_calls=false: fragments of any call after the first are dropped."""
        if parsed is not None and not self.tools.parallel and parsed.tool_calls:
            parsed.tool_calls = [c for c in parsed.tool_calls if c.index == 0]
        return parsed

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs]) -> list[ChatCompletionLogProbsContent]:
        limit = self.request.top_logprobs or 0
        serving = self.serving
        out = []
        for token_id, position in zip(token_ids, positions):
            entry = position.get(token_id)
            token = serving.token_text(token_id, entry)
            top = [ChatCompletionLogProb(token=(t := serving.token_text(tid, lp)), logprob=clamp_logprob(lp.logprob),
                                         bytes=list(t.encode("utf-8")))
                   for tid, lp in serving.top_entries(position, limit)]
            out.append(ChatCompletionLogProbsContent(
                token=token, logprob=clamp_logprob(entry.logprob if entry is not None else float("-inf")),
                bytes=list(token.encode("utf-8")), top_logprobs=top))
        return out

    def _usage(self) -> UsageInfo:
        completion = sum(c.num_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion,
                         prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=self.num_cached_tokens))

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> ChatCompletionResponse:
        async for out in outputs:
            self.num_cached_tokens = out.num_cached_tokens
            for delta in out.outputs:
                self._take(delta)
        choices = [
            ChatCompletionResponseChoice(
                index=i, message=self._message(c),
                logprobs=ChatCompletionLogProbs(content=c.logprobs) if self.request.logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in enumerate(self.choices)
        ]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.serving.model_name,
                                      choices=choices, usage=self._usage())

    def _message(self, choice: _Choice) -> ChatMessageOut:
        if choice.parser is None:
            return ChatMessageOut(content=choice.text)
        parsed = choice.parser.result()
        calls = parsed.tool_calls if self.tools.parallel else parsed.tool_calls[:1]
        return ChatMessageOut(content=parsed.content, reasoning_content=parsed.reasoning_content,
                              tool_calls=[ToolCallOut(id=c.id, function=FunctionCallOut(
                                  name=c.function.name, arguments=c.function.arguments)) for c in calls] or None)

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage: Optional[UsageInfo] = None) -> str:
        return sse(ChatCompletionStreamResponse(id=self.request_id, created=self.created,
                                                model=self.serving.model_name, choices=choices, usage=usage))

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        try:
            # OpenAI's first delta of each choice carries the role and an empty content.
            for i in range(self.request.n):
                yield self._chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                                         content=""))])
            async for out in outputs:
                self.num_cached_tokens = out.num_cached_tokens
                for delta in out.outputs:
                    parsed, logprobs = self._take(delta)
                    if parsed is None and delta.finish_reason is None and not logprobs:
                        continue
                    c = self.choices[delta.index]
                    choice = ChatCompletionStreamChoice(
                        index=delta.index, delta=_stream_delta(parsed),
                        logprobs=ChatCompletionLogProbs(content=logprobs) if logprobs is not None else None,
                        finish_reason=c.finish_reason if delta.finish_reason is not None else None,
                        stop_reason=delta.stop_reason)
                    yield self._chunk([choice], self._usage() if continuous else None)
            if include_usage:
                yield self._chunk([], self._usage())
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
            yield sse_error(exc, self.request_id)
        yield SSE_DONE


def _joined(first: Optional[ParsedDelta], second: Optional[ParsedDelta]) -> Optional[ParsedDelta]:
    if first is None or second is None:
        return first or second
    first.content = (first.content or "") + (second.content or "") or None
    first.reasoning_content = (first.reasoning_content or "") + (second.reasoning_content or "") or None
    first.tool_calls = first.tool_calls + second.tool_calls
    return first


def _stream_delta(parsed: Optional[ParsedDelta]) -> DeltaMessage:
    if parsed is None:
        return DeltaMessage()
    calls = [DeltaToolCallOut(index=c.index, id=c.id, type=c.type, function=DeltaFunctionCallOut(
        name=c.function.name, arguments=c.function.arguments)) for c in parsed.tool_calls]
    return DeltaMessage(content=parsed.content or None, reasoning_content=parsed.reasoning_content or None,
                        tool_calls=calls or None)
