"""The OpenAI-compatible HTTP server: the FastAPI app and `pagellm serve`'s entry point.

    build_app(engine, name, api_key, chat_template) -> FastAPI   routes, auth, limits, error shapes
    run_server(args)                                           load the engine, serve until SIGINT/SIGTERM

The app holds no engine state of its own: every route asks the AsyncLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

import pagellm
from pagellm.entrypoints.openai.errors import (
    OpenAIError,
    error_response,
    install_error_handlers,
    parse_json_body,
)
from pagellm.entrypoints.openai.http_protocol import header_timeout_protocol
from pagellm.entrypoints.openai.limits import ServerLimits
from pagellm.entrypoints.openai.middleware import (
    LOOPBACK_HOSTS,
    APIKeyMiddleware,
    BodyReadTimeoutMiddleware,
    EngineAliveMiddleware,
    BodySizeLimitMiddleware,
    InternalErrorMiddleware,
    MemoryTrimMiddleware,
    TrustedHostMiddleware,
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
from pagellm.entrypoints.openai.serving_lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
# Bodies at least this large are followed by a malloc_trim (see MemoryTrimMiddleware).
_TRIM_AFTER_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerOptions:
    """How the app guards itself; `pagellm serve` flags map onto these one to one."""

    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S
    # Host names the server answers; None: any. `pagellm serve` on a loopback address defaults
    # to the loopback names (see allowed_hosts_for).
    allowed_hosts: Optional[tuple[str, ...]] = None
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers at all
    metrics_require_api_key: bool = False
    limits: Optional[ServerLimits] = None  # None: derived from the engine's max_model_len
    # Output parsers of the chat endpoint, by registered name (see tool_parsers/, reasoning/).
    tool_call_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: Optional[str] = None


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def allowed_hosts_for(bind_host: str, extra: Optional[list[str]]) -> Optional[tuple[str, ...]]:
    """Loopback binds answer only loopback names (plus `extra`); other binds any name, or `extra` if given."""
    if is_loopback(bind_host):
        return tuple(sorted(LOOPBACK_HOSTS | {bind_host.strip("[]")} | set(extra or ())))
    return tuple(extra) if extra else None


class StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies go through `parse_json_body` (no NaN/Infinity, no lone surrogates)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def install_middleware(app: FastAPI, engine, api_key: Optional[str], options: ServerOptions) -> None:
    """The middleware stack; each add_middleware wraps the ones added before it."""
    app.add_middleware(MemoryTrimMiddleware, threshold_bytes=_TRIM_AFTER_BODY_BYTES)
    app.add_middleware(BodySizeLimitMiddleware, limit=options.max_request_body_bytes)
    app.add_middleware(BodyReadTimeoutMiddleware, timeout_s=options.body_read_timeout_s)
    if api_key:
        # Reachable without the key: load balancers (and, unless asked otherwise, Prometheus) carry none.
        open_paths = frozenset({"/health"} if options.metrics_require_api_key else {"/health", "/metrics"})
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(EngineAliveMiddleware, is_dead=lambda: engine.errored)
    if options.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed=options.allowed_hosts)
    app.add_middleware(InternalErrorMiddleware)  # outermost: catches whatever the others raise


def chat_parsers(options: ServerOptions) -> dict:
    """The chat endpoint's parser classes; ValueError (listing the known names) for an unknown one."""
    from pagellm.entrypoints.openai.reasoning import get_reasoning_parser
    from pagellm.entrypoints.openai.tool_parsers import get_tool_parser

    if options.enable_auto_tool_choice and options.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return {
        "tool_parser": get_tool_parser(options.tool_call_parser) if options.tool_call_parser else None,
        "enable_auto_tool_choice": options.enable_auto_tool_choice,
        "reasoning_parser": get_reasoning_parser(options.reasoning_parser) if options.reasoning_parser else None,
    }


# -- the app ------------------------------------------------------------------------------------------
def build_app(engine, served_model_name: str, api_key: Optional[str] = None, chat_template: Optional[str] = None,
              *, options: Optional[ServerOptions] = None) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncLLM) as `served_model_name`.

    `chat_template` is template text (overrides the tokenizer's). The engine is shut down when
    the app's lifespan ends.
    """
    options = options or ServerOptions()
    max_model_len = engine.config.max_model_len
    limits = options.limits or ServerLimits.for_context(max_model_len)
    completions = OpenAIServingCompletion(engine, served_model_name, limits)
    chat = OpenAIServingChat(engine, served_model_name, chat_template, limits, **chat_parsers(options))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn has stopped accepting and drained (or timed out) in-flight requests by now.
        engine.shutdown()
        app.state.engine_stopped = True

    app = FastAPI(title="pagellm", version=pagellm.__version__, lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    install_error_handlers(app)
    install_middleware(app, engine, api_key, options)

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

    def adapter_cards() -> list[ModelCard]:
        return [ModelCard(**card, max_model_len=max_model_len) for card in completions.loras.cards()]

    @app.get("/v1/models")
    async def list_models():
        return JSONResponse(ModelList(data=[model_card(), *adapter_cards()]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if completions.check_model(model_id) is not None:
            return JSONResponse(next(c for c in adapter_cards() if c.id == model_id).model_dump())
        return JSONResponse(model_card().model_dump())

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        return Response(await completions.loras.load(body), media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return Response(await completions.loras.unload(body), media_type="text/plain")

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
            text = await engine.run_off_loop(chat.render_prompt, body.messages, body.add_generation_prompt,
                                             body.continue_final_message, body.chat_template_kwargs)
            limits.check_text(len(text), "messages")
        else:
            text = body.prompt
            limits.check_text(len(text), "prompt")
        ids = list(await engine.run_off_loop(tok.encode, text, add_special_tokens=body.add_special_tokens)) if text else []
        token_strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                                             token_strs=token_strs).model_dump())

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        completions.check_model(body.model)
        tok = completions.require_tokenizer("/detokenize")
        vocab_size = engine.model_config.vocab_size
        limits.check_text(len(body.tokens), "tokens")  # every token is at least one character
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise OpenAIError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", 400,
                              param="tokens", code="invalid_value")
        return JSONResponse(DetokenizeResponse(prompt=await engine.run_off_loop(tok.decode, body.tokens)).model_dump())

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


def server_options(args: argparse.Namespace, max_model_len: int) -> ServerOptions:
    limits = ServerLimits.for_context(max_model_len, max_prompt_chars=args.max_prompt_chars,
                                      max_chat_messages=args.max_chat_messages,
                                      max_prompts=args.max_prompts_per_request,
                                      prompt_logprobs_budget=args.prompt_logprobs_budget,
                                      max_n=args.max_n, request_timeout_s=args.request_timeout)
    return ServerOptions(max_request_body_bytes=args.max_request_body_bytes,
                         body_read_timeout_s=args.body_read_timeout,
                         allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
                         allowed_origins=tuple(args.allowed_origins or ()),
                         metrics_require_api_key=args.metrics_require_api_key, limits=limits,
                         tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                         reasoning_parser=args.reasoning_parser)


def uvicorn_config(app, args: argparse.Namespace) -> uvicorn.Config:
    # Forwarded-for headers are believed only from the listed proxies; with none listed,
    # uvicorn would otherwise trust 127.0.0.1 (its default), so any local process could
    # choose the client address the logs show.
    proxies = args.forwarded_allow_ips
    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                          access_log=not args.disable_uvicorn_access_log, lifespan="on",
                          timeout_keep_alive=args.timeout_keep_alive, proxy_headers=bool(proxies),
                          forwarded_allow_ips=proxies or [], http=header_timeout_protocol(args.header_read_timeout))


def admission_limits(args: argparse.Namespace, max_num_seqs: int):
    from pagellm.engine.admission import AdmissionLimits, default_max_waiting_seqs

    waiting = args.max_waiting_requests
    if waiting is None:
        waiting = default_max_waiting_seqs(max_num_seqs)
    return AdmissionLimits(max_waiting_seqs=None if waiting < 0 else waiting)


def run_server(args: argparse.Namespace) -> int:
    from pagellm.config import EngineConfig
    from pagellm.engine.async_llm import AsyncLLM
    from pagellm.entrypoints.cli import engine_kwargs

    config = EngineConfig(**engine_kwargs(args))
    chat_template = _read_chat_template(args.chat_template) if args.chat_template else None
    api_key = args.api_key or os.environ.get("PAGELLM_API_KEY") or None
    served_name = args.served_model_name or default_served_name(config.model)

    engine = AsyncLLM.from_config(config, engine_process=not args.engine_in_process, model_name=served_name,
                                  # every data-parallel core runs its own batch of max_num_seqs
                                  admission=admission_limits(args, config.max_num_seqs * config.data_parallel_size),
                                  restart_on_failure=args.restart_engine_on_failure)
    app = None
    engine_died = threading.Event()
    try:
        for name, path in (getattr(args, "lora_modules", None) or []):
            engine.intake.loras.add(name, path)  # ValueError (bad adapter, or no --enable-lora): the CLI's message
        app = build_app(engine, served_name, api_key, chat_template,
                        options=server_options(args, engine.config.max_model_len))
        server = GracefulServer(uvicorn_config(app, args), grace_s=args.shutdown_timeout, abort_all=engine.shutdown)

        def exit_on_engine_death(reason: str) -> None:
            # A supervisor (systemd, Kubernetes) restarts a server that exits; one that lives on
            # answering 503 would need a human.
            print(f"[pagellm] the engine core died ({reason}); stopping the server (exit status 1)",
                  file=sys.stderr, flush=True)
            engine_died.set()
            server.should_exit = True

        engine.add_dead_callback(exit_on_engine_death)
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
        return 1 if engine_died.is_set() or not server.started else 0
    finally:
        if app is None or not getattr(app.state, "engine_stopped", False):
            engine.shutdown()
