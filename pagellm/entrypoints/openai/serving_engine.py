"""What the completions and chat handlers share: model-name checks, the context-length
budget, request validation, request ids, stream plumbing and logprob formatting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from types import MappingProxyType
from typing import Any, AsyncIterator, Awaitable, Mapping, Optional, TypeVar

from fastapi import Request
from pydantic import BaseModel

from pagellm.entrypoints.openai.errors import (OpenAIError, error_body, from_engine_error, from_value_error,
                                            internal_error_message)
from pagellm.entrypoints.openai.limits import ServerLimits
from pagellm.entrypoints.openai.serving_lora import LoRAServing
from pagellm.outputs import Logprob, PositionLogprobs
from pagellm.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)

# JSON has no -inf; OpenAI clients expect a number, so impossible tokens get this floor instead.
_LOGPROB_FLOOR = -9999.0


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON body."""
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException, request_id: str) -> str:
    """A failure after the stream began (the 200 headers are already sent): an error event in OpenAI's shape.

    Unexpected failures name only their class and the request id; the traceback goes to the log.
    """
    if isinstance(exc, OpenAIError):
        return sse(error_body(exc.message, exc.status, exc.param, exc.code))
    if isinstance(exc, ValueError):
        err = from_value_error(exc)
        return sse(error_body(err.message, 400, err.param, err.code))
    engine_error = from_engine_error(exc)
    if engine_error is not None:
        err = engine_error[0]
        return sse(error_body(err.message, err.status, err.param, err.code))
    logger.error("stream %s failed after it started", request_id, exc_info=exc)
    return sse(error_body(internal_error_message(request_id), 500, None, "internal_error"))


def clamp_logprob(value: float) -> float:
    if math.isnan(value) or value < _LOGPROB_FLOOR:
        return _LOGPROB_FLOOR
    return float(value)


class OpenAIServing:
    """Base of the endpoint handlers: owns nothing but references to the engine and its tokenizer."""

    # How errors name fields: SamplingParams field -> request field, and the prompt's field.
    param_names: Mapping[str, str] = MappingProxyType({})
    prompt_param = "prompt"

    def __init__(self, engine, served_model_name: str, limits: Optional[ServerLimits] = None) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.config.max_model_len
        self.limits = limits or ServerLimits.for_context(self.max_model_len)
        self.loras = LoRAServing(engine, served_model_name)

    # -- checks ---------------------------------------------------------------------------
    def check_model(self, model: Optional[str]):
        """The LoRARequest `model` names (None: the base model); 404 for a name this server does not serve."""
        return self.loras.resolve(model)

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(f"{what} needs a tokenizer, and this server was started with --skip-tokenizer-init; "
                              "send token ids instead", 400, code="no_tokenizer")
        return self.tokenizer

    def max_tokens_for(self, prompt_len: int, requested: Optional[int], param: str) -> int:
        """The request's max_tokens, checked against the context; None means "the rest of the context"."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise OpenAIError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt is "
                f"{prompt_len} tokens long, which leaves no room for a completion; shorten the prompt",
                400, param="messages" if param == "max_completion_tokens" else "prompt",
                code="context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise OpenAIError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len + requested} "
                f"were requested ({prompt_len} in the prompt + {requested} in {param}); reduce the prompt or "
                f"{param} (at most {room} for this prompt)",
                400, param=param, code="context_length_exceeded")
        return requested

    def bad_value(self, exc: ValueError) -> OpenAIError:
        """A ValueError from SamplingParams / the engine's input checks, as a 400 naming the request field."""
        return from_value_error(exc, dict(self.param_names), self.prompt_param)

    def build_params(self, fields, max_tokens: int, logprobs: Optional[int],
                     prompt_logprobs: Optional[int], constraint: Optional[dict] = None) -> SamplingParams:
        self.limits.check_n(fields.n)
        try:
            return fields.to_sampling_params(max_tokens, logprobs, prompt_logprobs, constraint)
        except ValueError as exc:
            raise self.bad_value(exc) from None

    async def prepare(self, request_id: str, prompt_ids: list[int], cache_salt: Optional[str],
                      params: SamplingParams, priority: int = 0, lora_request=None):
        """The engine's own input checks (vocabulary, lengths) and tokenization, off the event loop.

        Nothing is queued yet: a multi-prompt request prepares every prompt first, so a bad
        second prompt never leaves the first one generating for nobody.
        """
        try:
            return await self.engine.prepare(self.engine_prompt(prompt_ids, cache_salt), params, request_id,
                                             priority=priority, lora_request=lora_request)
        except ValueError as exc:
            raise self.bad_value(exc) from None

    def generate(self, prepared, params: SamplingParams, request_id: str, arrival: float):
        """The engine's output stream for a prepared request, under the server's deadline (--request-timeout)."""
        return self.engine.generate(prepared, params, request_id, deadline=self.limits.deadline(arrival))

    @staticmethod
    def engine_prompt(prompt_ids: list[int], cache_salt: Optional[str]):
        """The prompt as the engine takes it: token ids, with the request's cache_salt when it has one."""
        if cache_salt is None:
            return prompt_ids
        return {"prompt_token_ids": prompt_ids, "cache_salt": cache_salt}

    # -- text ------------------------------------------------------------------------------
    async def encode(self, text: str, add_special_tokens: bool, param: Optional[str] = None) -> list[int]:
        """Token ids of `text`, after the character limit (checked before any tokenizing), off the event loop."""
        param = param or self.prompt_param
        tokenizer = self.require_tokenizer("a text prompt")
        if text == "":
            raise OpenAIError("the prompt is empty", 400, param=param, code="invalid_value")
        self.limits.check_text(len(text), param)
        return list(await self.engine.run_off_loop(tokenizer.encode, text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids)

    def token_text(self, token_id: int, entry: Optional[Logprob] = None) -> str:
        """A token as text for logprobs; `token_id:N` when there is no tokenizer (vLLM's convention)."""
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def top_entries(self, position: PositionLogprobs, limit: int) -> list[tuple[int, Logprob]]:
        """The `limit` most likely tokens at a position, most likely first."""
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else math.inf)
        return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= limit][:limit]


# -- async plumbing ---------------------------------------------------------------------------
async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Leaving early (error, client gone) closes every iterator, which aborts its request.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, item
    finally:
        for future in pending:
            future.cancel()
        # Close every iterator once its in-flight `anext` has unwound. Shielded: this may run
        # inside a cancelled scope (client gone), and an abort must not be cut short.
        in_flight = {i: f for f, i in pending.items()}
        closers = [asyncio.ensure_future(_close_when_idle(s, in_flight.get(i))) for i, s in enumerate(streams)]
        await asyncio.shield(asyncio.gather(*closers))


async def _close_when_idle(stream: AsyncIterator, future: Optional[asyncio.Future]) -> None:
    if future is not None:
        await asyncio.wait([future])
    with contextlib.suppress(Exception):
        await stream.aclose()


_NOTHING = object()


async def start_stream(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Waits for the first item, so an error raised before it (a ValueError on bad input) can still
    become an HTTP error status; returns an iterator that replays that item and then the rest."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = _NOTHING
    except BaseException:
        await stream.aclose()
        raise

    async def replay() -> AsyncIterator[T]:
        try:
            if first is not _NOTHING:
                yield first  # type: ignore[misc]
                async for item in stream:
                    yield item
        finally:
            await stream.aclose()

    return replay()


class ClientDisconnected(Exception):
    """The client went away before the response was ready; the work was cancelled."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` (a handler building its response) and cancels it if the client disconnects first.

    Without this a non-streaming request keeps generating after its client has gone;
    cancelling the handler closes its output iterators, which aborts the engine requests.
    Streaming bodies are covered by Starlette, which cancels the body on disconnect.
    """
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()
