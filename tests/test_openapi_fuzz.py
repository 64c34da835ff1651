"""Fuzzing the server in-process (ASGI, no network) over a real AsyncLLM on a tiny random model
with SmolLM2's tokenizer: schemathesis against the app's own OpenAPI schema, and hypothesis
driving every SamplingParams field with extreme values. Never a 5xx; every error is OpenAI-shaped
with a code; the engine is healthy afterwards.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from pagellm.entrypoints.openai.server import build_app

MAX_MODEL_LEN = 256  # the shared tiny_chat_engine's
MAX_TOKENS_CAP = 4  # keeps every generated completion short, so hundreds of cases stay quick


@pytest.fixture(scope="module")
def engine(tiny_chat_engine):
    return tiny_chat_engine


def assert_openai_shaped(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["code"], str) and error["code"], error


def assert_healthy(http) -> None:
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    stats = http.get("/metrics")
    assert stats.status_code == 200


def cap_generation(body) -> None:
    """Bounds what a generated case may ask the engine to do (not what it may send)."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if type(body.get(key)) is int and body[key] > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS_CAP  # None means "the rest of the context"


# -- hypothesis: every SamplingParams field at its extremes, through the HTTP API ---------------------------------
_EXTREME_FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(
    [0.0, -0.0, 1e-300, -1e-300, 1e-6, 1e308, -1e308, 2.0, -2.0, 100.0, -100.0, 1.0000001]))
_EXTREME_INTS = st.one_of(st.integers(-5, 300), st.sampled_from(
    [-(2 ** 63), -1, 0, 1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 30, 49151, 49152]))
_TOKEN_IDS = st.lists(_EXTREME_INTS, max_size=5)
_FIELDS = {
    "n": _EXTREME_INTS, "temperature": _EXTREME_FLOATS, "top_p": _EXTREME_FLOATS, "top_k": _EXTREME_INTS,
    "min_p": _EXTREME_FLOATS, "presence_penalty": _EXTREME_FLOATS, "frequency_penalty": _EXTREME_FLOATS,
    "repetition_penalty": _EXTREME_FLOATS, "seed": _EXTREME_INTS, "max_tokens": _EXTREME_INTS,
    "min_tokens": _EXTREME_INTS, "logprobs": _EXTREME_INTS, "prompt_logprobs": _EXTREME_INTS,
    "stop": st.lists(st.text(max_size=4), max_size=3), "stop_token_ids": _TOKEN_IDS,
    "allowed_token_ids": _TOKEN_IDS, "bad_words": st.lists(st.text(max_size=4), max_size=3),
    "logit_bias": st.dictionaries(st.integers(-3, 60000).map(str), _EXTREME_FLOATS, max_size=3),
    "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(), "echo": st.booleans(),
    "skip_special_tokens": st.booleans(), "spaces_between_special_tokens": st.booleans(),
}


def _bounded(body: dict) -> dict:
    # n x tokens stays small: the point is the values' validation, not a long generation.
    if type(body.get("n")) is int and body["n"] > 8:
        body["n"] = body["n"] if body["n"] > 128 else 8
    cap_generation(body)
    return body


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fields=st.fixed_dictionaries({}, optional=_FIELDS), chat=st.booleans(), stream=st.booleans())
def _drive_sampling_fields(http, fields, chat, stream):
    body = _bounded({**fields, "stream": stream})
    if chat:
        body.pop("echo", None)
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body.pop("logprobs"), True
        path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]}
    else:
        path, body = "/v1/completions", {**body, "prompt": "hello there"}
    response = http.post(path, json=body)
    assert_openai_shaped(response)
    if stream and response.status_code == 200:
        assert '"internal_error"' not in response.text, response.text  # no in-band 500 either


def test_extreme_sampling_values_are_2xx_or_4xx_and_the_engine_stays_healthy(engine):
    http = TestClient(build_app(engine, "tiny"), raise_server_exceptions=False)  # no lifespan: engine stays up
    _drive_sampling_fields(http)
    assert_healthy(http)


# -- schemathesis: the whole API from its OpenAPI schema -----------------------------------------------------------
class _SharedEngine:
    """The engine, minus shutdown: schemathesis ends the app's lifespan after each operation's test."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def shutdown(self) -> None:
        pass


def test_openapi_fuzz_never_5xx_and_errors_are_openai_shaped(engine):
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(_SharedEngine(engine), "tiny"))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    calls = 0
    for operation, mode in itertools.product(operations, list(GenerationMode)):  # valid and invalid inputs
        @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=operation.as_strategy(mode))
        def fuzz(case):
            nonlocal calls
            cap_generation(case.body)
            assert_openai_shaped(case.call())
            calls += 1

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones
    print(f"{calls} schemathesis cases over {len(operations)} operations")
    assert calls >= 200
    assert_healthy(TestClient(build_app(engine, "tiny"), raise_server_exceptions=False))
