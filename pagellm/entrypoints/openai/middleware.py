"""Pure-ASGI middleware of the server (streaming responses and disconnects pass straight through).

From the outside in (see `server.install_middleware`):

    InternalErrorMiddleware    an unexpected exception -> 500 naming the class and a request id
    TrustedHostMiddleware      Host headers outside the allowed names -> 400 (DNS rebinding)
    EngineAliveMiddleware      while the engine core is dead (or restarting): 503 engine_dead on every route
    CORSMiddleware             (Starlette's, only with --allowed-origins)
    APIKeyMiddleware           401 without the key, except on the open paths
    BodyReadTimeoutMiddleware  a body not fully received in time -> 408, connection closed
    BodySizeLimitMiddleware    413 over the byte limit
    MemoryTrimMiddleware       after a large body, hands freed heap pages back to the OS
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import logging
import re
import threading
import uuid
from typing import Callable, Iterable, Optional

from pagellm.entrypoints.openai.errors import (
    BodyReadTimeout,
    RequestTooLarge,
    error_response,
    internal_error_response,
)

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _header(scope, name: bytes) -> Optional[bytes]:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def request_id_of(scope) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    given = _header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return f"req-{uuid.uuid4().hex}"


class EngineAliveMiddleware:
    """Answers 503 `engine_dead` on every route while `is_dead()`: a load balancer or client then
    sees one consistent signal, instead of /v1/models and /metrics answering 200 from a server
    that cannot generate."""

    def __init__(self, app, is_dead: Callable[[], bool]) -> None:
        self.app = app
        self.is_dead = is_dead

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.is_dead():
            response = error_response("the engine is not running; retry later", 503, None, "engine_dead")
            response.headers["Retry-After"] = "5"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """Turns an exception escaping the app into a 500 without re-raising it.

    Starlette's own error middleware re-raises after answering, and uvicorn then closes the
    socket under a response that promised keep-alive: the client's next request on that
    connection is reset. Answering here keeps the connection usable; it is closed
    (`Connection: close`) only when the request body was not read to its end.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        body_done = False

        async def tracked_receive():
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, tracked_receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - every failure class ends here
            if started:
                raise  # mid-response: nothing valid can follow; uvicorn closes the connection
            request_id = request_id_of(scope)
            logger.error("unhandled error while serving %s %s (request id %s)", scope.get("method"),
                         scope.get("path"), request_id, exc_info=exc)
            await internal_error_response(request_id, close=not body_done)(scope, receive, send)


def host_name(host_header: bytes) -> str:
    """The name in a Host header, lower case, without port or IPv6 brackets."""
    text = host_header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class TrustedHostMiddleware:
    """Answers only requests whose Host names one of `allowed` ("*": any).

    A web page can point a name it controls at 127.0.0.1 (DNS rebinding); the browser then
    sends that name as Host, which is how a loopback server tells the page's requests apart.
    Requests without a Host header (HTTP/1.0 tools) carry no rebinding risk and pass.
    """

    def __init__(self, app, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().strip("[]") for h in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            given = _header(scope, b"host")
            if given is not None and host_name(given) not in self.allowed:
                await error_response(f"the Host header {given.decode('latin-1')!r} is not allowed on this server "
                                     "(start it with --allowed-hosts to accept it)", 400, None,
                                     "host_not_allowed")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class APIKeyMiddleware:
    def __init__(self, app, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                message = ("missing API key: send it as 'Authorization: Bearer <key>'" if not given
                           else "invalid API key")
                await error_response(message, 401, None, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyReadTimeoutMiddleware:
    """408 (and a closed connection) when the whole body has not arrived `timeout_s` after the headers.

    One deadline for the whole body, not per chunk, so a client dripping a byte at a time
    cannot hold the connection either. Once the body is complete, `receive` (which then only
    waits for a disconnect) passes through untimed.
    """

    def __init__(self, app, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyReadTimeout(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                await error_response("the Content-Length header is not a number", 400, None,
                                     "invalid_content_length", close=True)(scope, receive, send)
                return
            if too_large:
                await error_response(f"the request body is larger than the limit of {self.limit} bytes", 413,
                                     None, "request_too_large", close=True)(scope, receive, send)
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


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None


class MemoryTrimMiddleware:
    """After a request with a large body, runs glibc's `malloc_trim(0)` in a thread.

    Freed large buffers (the raw body, the parsed JSON, the prompt text) go back to glibc's
    arenas, which keep them: after a burst of big bodies the server's RSS would stay at the
    burst's peak. Trimming returns the free pages to the OS. One trim runs at a time; a large
    request that ends during it asks for one more, so what it freed after that trim began is
    returned too (under load the last burst's bodies were otherwise left in the arenas).
    """

    def __init__(self, app, threshold_bytes: int) -> None:
        self.app = app
        self.threshold = threshold_bytes
        self.trim = _load_malloc_trim()
        self._lock = threading.Lock()  # the event loop and the trimming thread share the two flags
        self.trimming = False
        self.pending = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.trim is None:
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if received >= self.threshold:
                self._request_trim()

    def _request_trim(self) -> None:
        with self._lock:
            self.pending = True
            if self.trimming:
                return
            self.trimming = True
        asyncio.get_running_loop().run_in_executor(None, self._trim)

    def _trim(self) -> None:
        while True:
            with self._lock:  # the check and the reset under one lock, so no request slips between
                if not self.pending:
                    self.trimming = False
                    return
                self.pending = False
            try:
                self.trim(0)
            except BaseException:
                with self._lock:
                    self.trimming = False
                raise
