"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers route every failure path of the app through `error_response`: our own
`OpenAIError`, FastAPI's schema errors and malformed JSON (400, not FastAPI's 422
shape), Starlette's HTTP errors (404 route, 405, 408, 413). Every 4xx carries a
specific `code` (the list is in docs/architecture.md, "Serving: limits and errors").
Anything unexpected becomes a 500 in `middleware.InternalErrorMiddleware`: its body
names the failure class and a request id, never the exception's text, which goes to
the log with its traceback.

Request bodies are parsed by `parse_json_body` (pydantic's JSON parser), which refuses
what Python's `json` module lets through: `NaN`, `Infinity` and lone UTF-16 surrogates.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import pydantic_core
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagellm.engine.exceptions import EngineDeadError, EngineOverloadedError, RequestTimeoutError

logger = logging.getLogger(__name__)

# OpenAI's `type` for each status we return.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# "SamplingParams.top_p: must be in (0, 1], got 2.0" -> param "top_p".
_PARAM_IN_MESSAGE = re.compile(r"^SamplingParams\.(\w+):")
_NON_FINITE = re.compile(rb"\bNaN\b|\bInfinity\b")


class OpenAIError(Exception):
    """An error a handler raises on purpose; rendered as the OpenAI error body with `status`."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


class CodedHTTPError(HTTPException):
    """An HTTP error raised while the body is read (FastAPI's body parsing passes these through
    unchanged), carrying its OpenAI error code."""

    def __init__(self, status: int, message: str, code: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status, message, headers=headers)
        self.code = code


class RequestTooLarge(CodedHTTPError):
    def __init__(self, limit: int) -> None:
        # The rest of the body is not worth reading: close the connection after the answer.
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes", "request_too_large",
                         {"Connection": "close"})


class BodyReadTimeout(CodedHTTPError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s", "request_timeout",
                         {"Connection": "close"})


class InvalidJSON(CodedHTTPError):
    def __init__(self, message: str, code: str = "invalid_json") -> None:
        super().__init__(400, message, code)


def parse_json_body(body: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity, no lone surrogates (neither escaped nor raw), no trailing data."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        detail = str(exc)
        if "surrogate" in detail or "unicode" in detail or "hex escape" in detail:
            raise InvalidJSON(f"the request body is not valid JSON: {detail} (a \\u escape must name a "
                              "Unicode character; lone UTF-16 surrogates are not allowed)", "invalid_unicode") from None
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        hint = " (NaN and Infinity are not JSON numbers)" if _NON_FINITE.search(raw) else ""
        raise InvalidJSON(f"the request body is not valid JSON: {detail}{hint}") from None


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(message: str, status: int, param: Optional[str] = None,
                   code: Optional[str] = None, *, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def internal_error_message(request_id: str) -> str:
    return f"internal server error; the server log has the details under request id {request_id}"


def internal_error_response(request_id: str, *, close: bool = False) -> JSONResponse:
    response = error_response(internal_error_message(request_id), 500, None, "internal_error", close=close)
    response.headers["X-Request-Id"] = request_id
    return response


def from_engine_error(exc: BaseException) -> Optional[tuple[OpenAIError, dict[str, str]]]:
    """The engine's "cannot serve this now" errors as (OpenAI error, response headers); None for others.

    Their messages carry no internals (queue sizes, a deadline), so they are shown as they are;
    an engine-dead reason (which may quote the core's exception) is not.
    """
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(str(exc), 429, code="queue_full"), {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, EngineDeadError):
        return OpenAIError("the engine is not running; retry later", 503, code="engine_dead"), {"Retry-After": "5"}
    if isinstance(exc, RequestTimeoutError):
        return OpenAIError(str(exc) + " (--request-timeout)", 504, code="request_deadline_exceeded"), {}
    return None


def from_value_error(exc: ValueError, param_names: Optional[dict[str, str]] = None,
                     prompt_param: Optional[str] = None) -> OpenAIError:
    """A ValueError from SamplingParams / the input processor -> 400, naming the field when we know it.

    `param_names` maps an internal field to the request field the user actually sent
    (chat's `top_logprobs` is SamplingParams' `logprobs`); errors about the prompt name
    `prompt_param` ("prompt", or "messages" for chat).
    """
    message = str(exc)
    match = _PARAM_IN_MESSAGE.match(message)
    param = match.group(1) if match else None
    if param is not None and param_names:
        param = param_names.get(param, param)
    if param is None and "prompt" in message:
        param = prompt_param
    return OpenAIError(message, 400, param=param, code="invalid_value")


def _field_path(loc) -> tuple[list[str], bool]:
    """A pydantic error location without the "body" prefix and union-branch tags; and whether it had tags."""
    parts, tagged = [], False
    for part in loc:
        text = str(part)
        if part == "body":
            continue
        if isinstance(part, str) and ("[" in text or text in _UNION_TAGS):
            tagged = True  # e.g. prompt -> "list[int]" -> 0: pydantic names the union branch it tried
            continue
        parts.append(text)
    return parts, tagged


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})
# What the union-typed fields accept, for a readable message instead of one line per branch.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts",
    "tool_choice": "a string or an object",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str], str]:
    """(message, param, code) from pydantic's error list; names the first offending field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON: {detail}", None, "invalid_json"
    loc, tagged = _field_path(first.get("loc", ()))
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        raw = first.get("input")
        if isinstance(raw, (bytes, str)):  # sent without a JSON content type, so FastAPI did not parse it
            try:
                parse_json_body(raw)
            except InvalidJSON as exc:
                return exc.detail, None, exc.code
            return "send the JSON body with the header 'Content-Type: application/json'", None, "invalid_request"
        return "the request body must be a JSON object", None, "invalid_request"
    if first.get("type") == "finite_number":
        param = ".".join(loc) or None
        return f"{param or 'body'}: must be a finite number (not NaN or Infinity)", param, "invalid_value"
    param = ".".join(loc) if loc else None
    if tagged:
        # A union field: report it once, by what it accepts, not per branch tried.
        base = loc[0] if loc else "body"
        field = next((p for p in reversed(loc) if p in _UNION_FIELDS), base)
        accepted = _UNION_FIELDS.get(field, "one of the accepted types")
        return f"{base}: invalid value; {field} must be {accepted}", base, "invalid_value"
    parts = []
    for err in errors[:3]:
        where = ".".join(_field_path(err.get("loc", ()))[0]) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.param, exc.code)

    async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
        err, headers = from_engine_error(exc)  # type: ignore[misc]
        response = error_response(err.message, err.status, err.param, err.code)
        response.headers.update(headers)
        return response

    for engine_error in (EngineOverloadedError, EngineDeadError, RequestTimeoutError):
        app.add_exception_handler(engine_error, _engine_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return error_response(message, 400, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404 and exc.detail == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        code = getattr(exc, "code", None) or _HTTP_CODES.get(status, "http_error")
        return JSONResponse(error_body(message, status, None, code), status_code=status, headers=exc.headers)


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "request_too_large", 415: "unsupported_media_type"}

