"""POST /v1/completions: prompts in, text completions out (whole, or streamed as SSE)."""

from __future__ import annotations

import time

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi.responses import JSONResponse, StreamingResponse

from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    PromptTokenUsageInfo,
    UsageInfo,
    now,
)
from pagellm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    clamp_logprob,
    merge_streams,
    random_id,
    sse,
    sse_error,
    start_stream,
)
from pagellm.outputs import CompletionOutput, PositionLogprobs, RequestOutput


@dataclass
class _Prompt:
    text: Optional[str]  # None for token-id prompts (echo decodes them)
    token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    num_cached_tokens: int = 0


@dataclass
class _Choice:
    """One completion being gathered from deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    started: bool = False  # streaming: the first chunk (which carries any echo) went out
    text_offset: int = 0  # streaming: where the next token starts in the text sent so far

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest):
        arrival = time.monotonic()
        lora = self.check_model(request.model)
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported (pagellm has no fill-in-the-middle mode); remove it",
                              400, param="suffix", code="unsupported_parameter")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError("best_of is not supported; use n to get several completions", 400, param="best_of",
                              code="unsupported_parameter")
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("stream_options is only allowed with stream=true", 400, param="stream_options",
                              code="invalid_value")
        # echo with max_tokens=0 scores the prompt without generating (lm-eval style): the
        # engine still samples one token, which is dropped from the response.
        prompt_only = request.echo and request.max_tokens == 0
        want_prompt_logprobs = request.echo and request.logprobs is not None
        prompts = await self._prompts(request)
        prompt_logprobs = request.logprobs if want_prompt_logprobs else request.prompt_logprobs
        self.limits.check_prompt_logprobs([len(p.token_ids) for p in prompts], prompt_logprobs,
                                          "logprobs" if want_prompt_logprobs else "prompt_logprobs")
        request_id = random_id("cmpl")
        streams = []
        for i, prompt in enumerate(prompts):
            max_tokens = 1 if prompt_only else self.max_tokens_for(len(prompt.token_ids), request.max_tokens,
                                                                    "max_tokens")
            params = self.build_params(request, max_tokens, request.logprobs, prompt_logprobs)
            rid = f"{request_id}-{i}"
            prepared = await self.prepare(rid, prompt.token_ids, request.cache_salt, params, request.priority, lora)
            streams.append((prepared, params, rid))
        merged = merge_streams([self.generate(prepared, params, rid, arrival) for prepared, params, rid in streams])
        try:
            merged = await start_stream(merged)
        except ValueError as exc:
            raise self.bad_value(exc) from None
        run = _Run(self, request, request_id, prompts, prompt_only)
        if request.stream:
            return StreamingResponse(run.stream(merged), media_type="text/event-stream")
        return JSONResponse((await run.collect(merged)).model_dump())

    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            items = [raw]  # one token-id prompt
        else:
            items = list(raw)
        if not items:
            raise OpenAIError("prompt is empty; give a string, a list of strings, token ids or lists of token ids",
                              400, param="prompt", code="invalid_value")
        self.limits.check_prompt_count(len(items))
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, await self.encode(item, request.add_special_tokens)))
            elif not item:
                raise OpenAIError("a token-id prompt is empty", 400, param="prompt", code="invalid_value")
            else:
                prompts.append(_Prompt(None, list(item)))
        return prompts


class _Run:
    """One completions request in flight: turns the engine's deltas into OpenAI's response shapes."""

    def __init__(self, serving: OpenAIServingCompletion, request: CompletionRequest, request_id: str,
                 prompts: list[_Prompt], prompt_only: bool) -> None:
        self.serving = serving
        self.request = request
        self.request_id = request_id
        self.prompts = prompts
        self.prompt_only = prompt_only
        self.n = request.n
        self.choices = [_Choice() for _ in range(len(prompts) * self.n)]
        self.created = now()

    # -- bookkeeping ----------------------------------------------------------------------------
    def _take(self, prompt_index: int, out: RequestOutput) -> list[tuple[int, CompletionOutput]]:
        prompt = self.prompts[prompt_index]
        if out.prompt_logprobs is not None and prompt.prompt_logprobs is None:
            prompt.prompt_logprobs = out.prompt_logprobs
        prompt.num_cached_tokens = out.num_cached_tokens
        taken = []
        for delta in out.outputs:
            if self.prompt_only:  # the one sampled token is not part of the answer
                delta = CompletionOutput(delta.index, "", [], None, [], delta.finish_reason and "length")
            index = prompt_index * self.n + delta.index
            self.choices[index].add(delta)
            taken.append((index, delta))
        return taken

    def _usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        cached = sum(p.num_cached_tokens for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached))

    def _echo_text(self, prompt: _Prompt) -> str:
        return prompt.text if prompt.text is not None else self.serving.decode(prompt.token_ids)

    def _logprobs(self, token_ids: list[int], positions: list[Optional[PositionLogprobs]],
                  offset: int) -> tuple[CompletionLogProbs, int]:
        """OpenAI's completions logprobs for `token_ids`; offsets count from `offset` in the choice's text."""
        limit = self.request.logprobs or 0
        result = CompletionLogProbs()
        for token_id, position in zip(token_ids, positions):
            entry = position.get(token_id) if position is not None else None
            token = self.serving.token_text(token_id, entry)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(clamp_logprob(entry.logprob))
            top = {self.serving.token_text(tid, lp): clamp_logprob(lp.logprob)
                   for tid, lp in self.serving.top_entries(position, limit)}
            top.setdefault(token, clamp_logprob(entry.logprob))  # vLLM: the chosen token is always listed
            result.top_logprobs.append(top)
        return result, offset

    def _prompt_part(self, prompt: _Prompt) -> tuple[str, list[int], list[Optional[PositionLogprobs]]]:
        positions = prompt.prompt_logprobs or [None] * len(prompt.token_ids)
        return self._echo_text(prompt), prompt.token_ids, list(positions)

    # -- whole response ----------------------------------------------------------------------------
    async def collect(self, merged: AsyncIterator[tuple[int, RequestOutput]]) -> CompletionResponse:
        async for prompt_index, out in merged:
            self._take(prompt_index, out)
        choices = []
        for index, choice in enumerate(self.choices):
            prompt = self.prompts[index // self.n]
            text, token_ids, positions = choice.text, choice.token_ids, list(choice.logprobs)
            if self.request.echo:
                echo_text, echo_ids, echo_positions = self._prompt_part(prompt)
                text, token_ids, positions = echo_text + text, echo_ids + token_ids, echo_positions + positions
            logprobs = self._logprobs(token_ids, positions, 0)[0] if self.request.logprobs is not None else None
            choices.append(CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=choice.finish_reason,
                                                    stop_reason=choice.stop_reason))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.serving.model_name,
                                  choices=choices, usage=self._usage())

    # -- streamed response ---------------------------------------------------------------------------
    async def stream(self, merged: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        try:
            async for prompt_index, out in merged:
                for index, delta in self._take(prompt_index, out):
                    chunk_choice = self._chunk_choice(index, delta)
                    if chunk_choice is None:
                        continue
                    yield sse(CompletionStreamResponse(
                        id=self.request_id, created=self.created, model=self.serving.model_name,
                        choices=[chunk_choice], usage=self._usage() if continuous else None))
            if include_usage:
                yield sse(CompletionStreamResponse(id=self.request_id, created=self.created,
                                                   model=self.serving.model_name, choices=[], usage=self._usage()))
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
            yield sse_error(exc, self.request_id)
        yield SSE_DONE

    def _chunk_choice(self, index: int, delta: CompletionOutput) -> Optional[CompletionResponseChoice]:
        choice = self.choices[index]
        text, token_ids, positions = delta.text, list(delta.token_ids), list(delta.logprobs or [])
        if not choice.started:
            choice.started = True
            if self.request.echo:
                echo_text, echo_ids, echo_positions = self._prompt_part(self.prompts[index // self.n])
                text, token_ids, positions = echo_text + text, echo_ids + token_ids, echo_positions + positions
        elif not text and not token_ids and delta.finish_reason is None:
            return None
        logprobs = None
        if self.request.logprobs is not None:
            logprobs, choice.text_offset = self._logprobs(token_ids, positions, choice.text_offset)
        return CompletionResponseChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
