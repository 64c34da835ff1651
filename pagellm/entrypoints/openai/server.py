"""The OpenAI-compatible HTTP server: the FastAPI app and `pagellm serve`'s entry point.

    build_app(engine, name, api_key, chat_template) -> FastAPI   routes, auth, limits, error shapes
    run_server(args)                                           load the engine, serve until SIGINT/SIGTERM

The app holds no engine state of its own: every route asks the AsyncLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
from typing import Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import pagellm
from pagellm.entrypoints.openai.errors import (
    OpenAIError,
    RequestTooLarge,
    error_response,
    install_error_handlers,
)
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_engine import ClientDisconnected, cancel_on_disconnect

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20
# Reachable without the API key: load balancers and Prometheus scrapers carry no credentials.
_OPEN_PATHS = frozenset({"/health", "/metrics"})


# -- middleware (pure ASGI, so streaming responses and disconnects pass straight through) --------
class APIKeyMiddleware:
    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("missing API key: send it as 'Authorization: Bearer <key>'" if not given
                           else "invalid API key")
                await error_response(message, 401, None, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                await error_response("the Content-Length header is not a number", 400)(scope, receive, send)
                return
            if too_large:
                await error_response(f"the request body is larger than the limit of {self.limit} bytes", 413,
                                     None, "request_too_large")(scope, receive, send)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise RequestTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


# -- the app ------------------------------------------------------------------------------------------
def build_app(engine, served_model_name: str, api_key: Optional[str] = None, chat_template: Optional[str] = None,
              *, max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncLLM) as `served_model_name`.

    `chat_template` is template text (overrides the tokenizer's). The engine is shut down when
    the app's lifespan ends.
    """
    completions = OpenAIServingCompletion(engine, served_model_name)
    chat = OpenAIServingChat(engine, served_model_name, chat_template)
    max_model_len = engine.config.max_model_len

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn has stopped accepting and drained (or timed out) in-flight requests by now.
        engine.shutdown()
        app.state.engine_stopped = True

    app = FastAPI(title="pagellm", version=pagellm.__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, limit=max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last = runs first

    async def run_handler(raw: Request, work):
        try:
            return await cancel_on_disconnect(raw, work)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; the status is for the access log

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request):
        return await run_handler(raw, completions.create(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return await run_handler(raw, chat.create(body))

    def model_card() -> ModelCard:
        root = engine.config.model
        return ModelCard(id=served_model_name, root=root, max_model_len=max_model_len)

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        completions.check_model(model_id)
        return JSONResponse(model_card().model_dump())

    @app.get("/health")
    async def health():
        if engine.errored:  # the core died: tell the load balancer to stop sending traffic here
            return error_response("the engine core has stopped", 503, None, "engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": pagellm.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(content=engine.metrics.render(), media_type=engine.metrics.CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        # Refused while requests hold KV blocks: their cached blocks would stay findable.
        if not await engine.reset_prefix_cache():
            return error_response("the prefix cache was not reset: requests are still running; "
                                  "retry when the server is idle", 409, None, "engine_busy")
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        completions.check_model(body.model)
        tok = completions.require_tokenizer("/tokenize")
        if isinstance(body, TokenizeChatRequest):
            text = chat.render_prompt(body.messages, body.add_generation_prompt, body.continue_final_message,
                                      body.chat_template_kwargs)
        else:
            text = body.prompt
        ids = list(tok.encode(text, add_special_tokens=body.add_special_tokens)) if text else []
        token_strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                                             token_strs=token_strs).model_dump())

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        completions.check_model(body.model)
        tok = completions.require_tokenizer("/detokenize")
        vocab_size = engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", 400,
                              param="tokens", code="invalid_value")
        return JSONResponse(DetokenizeResponse(prompt=tok.decode(body.tokens)).model_dump())

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = completions.require_tokenizer("/tokenizer_info")
        return {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": engine.model_config.vocab_size,
            "model_max_length": max_model_len,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "special_tokens": list(tok.all_special_tokens),
            "chat_template": chat.template,
        }

    return app


# -- pagellm serve ------------------------------------------------------------------------------------------
def default_served_name(model: Optional[str]) -> str:
    """The name clients send as `model`: what the user passed, else the default model's file stem."""
    if model:
        return model
    from pagellm.loader import default_model_path

    return os.path.basename(default_model_path()).removesuffix(".gguf")


def _ignore_signal(signum, frame) -> None:
    """Stands in for the default handlers while uvicorn runs (see run_server)."""


# Time between aborting what still runs at the end of the grace period and uvicorn cancelling
# whatever has not finished by then: long enough for aborted streams to send their last chunk.
_ABORT_MARGIN_S = 2.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown aborts the requests still running after a grace period.

    uvicorn alone would cancel them mid-response (a cut connection and an error in the log);
    aborting them in the engine instead ends each one properly: a stream sends its final chunk
    (finish_reason "abort") and [DONE], a whole response comes back with what it had.
    """

    def __init__(self, config: uvicorn.Config, grace_s: float, abort_all: Callable[[], None]) -> None:
        config.timeout_graceful_shutdown = grace_s + _ABORT_MARGIN_S
        super().__init__(config)
        self.grace_s = grace_s
        self.abort_all = abort_all
        self.abort_future: Optional[asyncio.Future] = None

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if not first:
            return
        try:
            loop = asyncio.get_running_loop()  # the signal interrupts the main thread inside the loop
        except RuntimeError:
            return
        loop.call_later(self.grace_s, self._abort_in_flight, loop)

    def _abort_in_flight(self, loop: asyncio.AbstractEventLoop) -> None:
        # Off the loop: shutting the engine down joins its core, and the streams need the loop meanwhile.
        self.abort_future = loop.run_in_executor(None, self.abort_all)


def _read_chat_template(path: str) -> str:
    """The template file's text, checked to parse now rather than at the first chat request."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    with open(path, encoding="utf-8") as f:
        template = f.read()
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template {path}: line {exc.lineno}: {exc.message}") from None
    return template


def run_server(args: argparse.Namespace) -> int:
    from pagellm.config import EngineConfig
    from pagellm.engine.async_llm import AsyncLLM
    from pagellm.entrypoints.cli import engine_kwargs

    config = EngineConfig(**engine_kwargs(args))
    chat_template = _read_chat_template(args.chat_template) if args.chat_template else None
    api_key = args.api_key or os.environ.get("PAGELLM_API_KEY") or None
    served_name = args.served_model_name or default_served_name(config.model)

    engine = AsyncLLM.from_config(config, engine_process=not args.engine_in_process, model_name=served_name)
    app = None
    try:
        app = build_app(engine, served_name, api_key, chat_template,
                        max_request_body_bytes=args.max_request_body_bytes)
        server = GracefulServer(
            uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                           access_log=not args.disable_uvicorn_access_log, lifespan="on"),
            grace_s=args.shutdown_timeout, abort_all=engine.shutdown)
        print(f"[pagellm] serving {served_name!r} on http://{args.host}:{args.port}"
              f"{' (API key required)' if api_key else ''}", flush=True)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal under
        # the handlers it found, to die "by signal". Handlers that ignore it make the graceful
        # shutdown end the process with status 0 instead.
        previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if server.started else 1
    finally:
        if app is None or not getattr(app.state, "engine_stopped", False):
            engine.shutdown()
