"""Every error path of the OpenAI-compatible server returns its status and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, and never disturbs other requests.

A real `pagellm serve` (engine core in a thread of the server: `--engine-in-process`, API key
required, small body limit and context) takes raw HTTP for malformed bodies and the `openai`
SDK elsewhere. The 500 and no-chat-template paths need an engine or tokenizer that fails on
purpose, so they run the same app in-process over a stand-in engine.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from pagellm.benchmarks.server_process import ServerProcess

from fake_engine import RaisingEngine

pytestmark = pytest.mark.slow

NAME = "smollm"
KEY = "test-secret-key"
MAX_MODEL_LEN = 256
BODY_LIMIT = 64 << 10
SHUTDOWN_TIMEOUT = 2.0
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(smollm_path):
    proc = ServerProcess([smollm_path, "--served-model-name", NAME, "--engine-in-process", "--kv-cache-memory",
                          str(64 << 20), "--max-model-len", str(MAX_MODEL_LEN), "--max-request-body-bytes",
                          str(BODY_LIMIT), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)], env={"PAGELLM_API_KEY": KEY})
    try:
        proc.start()
        yield proc
    finally:
        status = proc.stop()
        log = proc.log()
        proc.close()
    assert status == 0, f"the server did not exit cleanly on SIGTERM (status {status}):\n{log}"


def assert_error(response: httpx.Response, status: int, param=None, code=None, contains=()) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    for fragment in contains:
        assert fragment in error["message"], error
    return error


def post(server, path: str, body=None, *, raw: bytes | None = None, headers=None) -> httpx.Response:
    headers = {**AUTH, **(headers or {})}
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json", **headers},
                          timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]


# -- malformed bodies and schema violations: 400, not FastAPI's 422 -----------------------------------------------
@pytest.mark.parametrize("raw, code", [
    (b"{not json", "invalid_json"),
    (b'{"prompt": "hi",}', "invalid_json"),
    (b"[1, 2, 3]", "invalid_request"),
    (b"", "invalid_request"),
])
def test_malformed_json_is_400(server, raw, code):
    assert_error(post(server, COMPLETIONS, raw=raw), 400, code=code)


@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, {"model": NAME}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": ["a", [1, 2]]}, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "no_such_field": 1}, "no_such_field"),
    (COMPLETIONS, {"prompt": "hi", "stop": 7}, "stop"),
    (CHAT, {"model": NAME}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages.0.role"),
    (CHAT, {"messages": HI, "logprobs": "yes please"}, "logprobs"),
])
def test_schema_violations_are_400_naming_the_field(server, path, body, param):
    assert_error(post(server, path, body), 400, param=param)


# -- unknown model 404, unknown route 404, wrong method 405 -----------------------------------------------------
def test_unknown_model_is_404(server):
    assert_error(post(server, COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}), 404, param="model",
                 code="model_not_found", contains=("gpt-4",))
    c = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, _strict_response_validation=True)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4", messages=HI)
    assert err.value.status_code == 404 and err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing-here", headers=AUTH), 404)
    assert_error(httpx.get(server.url + COMPLETIONS, headers=AUTH), 405)


# -- context length: the numbers are in the message -------------------------------------------------------------------
def test_prompt_plus_max_tokens_over_context_is_400_with_numbers(server):
    ids = [1000] * 50
    error = assert_error(post(server, COMPLETIONS, {"prompt": ids, "max_tokens": 300}), 400, param="max_tokens",
                         code="context_length_exceeded")
    for number in ("256", "350", "50", "300"):
        assert number in error["message"], error
    chat = assert_error(post(server, CHAT, {"messages": HI, "max_completion_tokens": 1000}), 400,
                        param="max_completion_tokens", code="context_length_exceeded")
    assert "256" in chat["message"] and "1000" in chat["message"]


def test_prompt_over_context_is_400_with_numbers(server):
    error = assert_error(post(server, COMPLETIONS, {"prompt": [1000] * 300}), 400, code="context_length_exceeded")
    assert "256" in error["message"] and "300" in error["message"]
    long_chat = [{"role": "user", "content": "word " * 400}]
    assert_error(post(server, CHAT, {"messages": long_chat}), 400, code="context_length_exceeded")


# -- invalid sampling values: 400 naming the field ------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param", [
    (COMPLETIONS, {"temperature": -0.5}, "temperature"),
    (COMPLETIONS, {"top_p": 1.5}, "top_p"),
    (COMPLETIONS, {"top_k": -3}, "top_k"),
    (COMPLETIONS, {"min_p": 2.0}, "min_p"),
    (COMPLETIONS, {"n": 0}, "n"),
    (COMPLETIONS, {"presence_penalty": 3.0}, "presence_penalty"),
    (COMPLETIONS, {"frequency_penalty": -2.5}, "frequency_penalty"),
    (COMPLETIONS, {"repetition_penalty": 0.0}, "repetition_penalty"),
    (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 5, "min_tokens": 10}, "min_tokens"),
    (COMPLETIONS, {"logprobs": 30}, "logprobs"),
    (COMPLETIONS, {"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"5": 500}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"999999": 1}}, "logit_bias"),
    (COMPLETIONS, {"stop_token_ids": [-1]}, "stop_token_ids"),
    (COMPLETIONS, {"stop": [""]}, "stop"),
    (COMPLETIONS, {"allowed_token_ids": []}, "allowed_token_ids"),
    (COMPLETIONS, {"suffix": "def"}, "suffix"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (COMPLETIONS, {"stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"temperature": -1}, "temperature"),
    (CHAT, {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
])
def test_invalid_values_are_400_naming_the_field(server, path, extra, param):
    body = {"model": NAME, **({"prompt": "Hello"} if path == COMPLETIONS else {"messages": HI}), **extra}
    assert_error(post(server, path, body), 400, param=param)


def test_invalid_prompts_and_messages(server):
    assert_error(post(server, COMPLETIONS, {"prompt": [999999]}), 400, param="prompt", contains=("999999",))
    assert_error(post(server, COMPLETIONS, {"prompt": ""}), 400, param="prompt")
    assert_error(post(server, COMPLETIONS, {"prompt": []}), 400, param="prompt")
    assert_error(post(server, CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, param="messages",
                 contains=("wizard",))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert_error(post(server, CHAT, {"messages": image}), 400, contains=("image_url",))


def test_sdk_raises_bad_request_with_param(server):
    c = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, _strict_response_validation=True)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=NAME, prompt="hi", temperature=-1)
    assert err.value.status_code == 400 and err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=NAME, messages=HI, stream=True, max_tokens=10_000)
    assert err.value.code == "context_length_exceeded"


# -- API key: 401 --------------------------------------------------------------------------------------------------------
def test_missing_or_wrong_api_key_is_401(server):
    body = {"prompt": "hi", "max_tokens": 1}
    assert_error(httpx.post(server.url + COMPLETIONS, json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(server.url + COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.post(server.url + "/tokenize", json={"prompt": "hi"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    # Health checks and metric scrapers carry no key.
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


# -- body size: 413 ----------------------------------------------------------------------------------------------------------
def test_oversized_body_is_413(server):
    big = {"prompt": "x" * (BODY_LIMIT + 10)}
    assert_error(post(server, COMPLETIONS, big), 413, code="request_too_large", contains=(str(BODY_LIMIT),))

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(server.url + COMPLETIONS, content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_error(response, 413, code="request_too_large")


# -- one bad request never affects another --------------------------------------------------------------------------------
def test_errors_do_not_disturb_a_running_stream(server):
    c = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, _strict_response_validation=True)
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=24, temperature=0)
    expected = c.chat.completions.create(**kwargs).choices[0].message.content
    streamed: list[str] = []

    def consume() -> None:
        for chunk in c.chat.completions.create(**kwargs, stream=True):
            streamed.extend(ch.delta.content or "" for ch in chunk.choices)

    thread = threading.Thread(target=consume)
    thread.start()
    for body in ({"prompt": [999999]}, {"prompt": "hi", "temperature": -1}, {"prompt": [1] * 400}):
        assert post(server, COMPLETIONS, body).status_code == 400
    assert post(server, COMPLETIONS, raw=b"{{{").status_code == 400
    thread.join(timeout=120)
    assert "".join(streamed) == expected
    assert httpx.get(server.url + "/health").status_code == 200


# -- graceful shutdown (last test on this server: it stops it) ---------------------------------------------------
def test_sigterm_with_a_stream_in_flight_exits_0(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True,
            "stream": True}
    started, lines = threading.Event(), []

    def consume() -> None:
        try:
            with httpx.stream("POST", server.url + COMPLETIONS, json=body, headers=AUTH, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        finally:
            started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(60) and lines
    begin = time.monotonic()
    status = server.stop(timeout=30)
    took = time.monotonic() - begin
    thread.join(10)
    assert status == 0, server.log()
    assert not thread.is_alive()
    # The request ran on for the grace period (--shutdown-timeout), then was aborted and ended
    # properly: a last chunk with its finish_reason, then [DONE], not a cut connection.
    assert took < SHUTDOWN_TIMEOUT + 10, took
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("abort", "length"), last
    assert "Traceback" not in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


# -- 500 and "no chat template", through the same app over a stand-in engine ------------------------------------------------
def _tiny_tokenizer():
    """A word-level tokenizer with no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", "hi", "there"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _BrokenEngine() -> RaisingEngine:
    """Fails the way a dead core would."""
    return RaisingEngine(RuntimeError("the engine core is gone"), tokenizer=_tiny_tokenizer(), vocab_size=7)


def test_engine_failure_is_500_and_missing_chat_template_is_400():
    from fastapi.testclient import TestClient

    from pagellm.entrypoints.openai.server import build_app

    engine = _BrokenEngine()
    with TestClient(build_app(engine, "tiny"), raise_server_exceptions=False) as http:
        for stream in (False, True):
            error = assert_error(http.post(COMPLETIONS, json={"prompt": "hello world", "stream": stream}), 500,
                                 code="internal_error")
            # The exception's text goes to the log; the client gets the failure class and a request id.
            assert "the engine core is gone" not in error["message"] and "request id req-" in error["message"]
        error = assert_error(http.post(CHAT, json={"messages": HI}), 400, code="no_chat_template")
        assert "--chat-template" in error["message"]
        assert_error(http.post("/tokenize", json={"messages": HI}), 400, code="no_chat_template")
        assert http.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"] == [3, 4]
    assert engine.shut_down  # the app's lifespan shuts the engine down


def test_chat_template_file_overrides_the_tokenizer(tmp_path):
    from fastapi.testclient import TestClient

    from pagellm.entrypoints.openai.server import build_app

    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}there{% endif %}"
    with TestClient(build_app(_BrokenEngine(), "tiny", None, template)) as http:
        got = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hello world"}]}).json()
        assert got["tokens"] == [3, 4, 6]
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # renders in the sandbox: refused, a 400
    with TestClient(build_app(_BrokenEngine(), "tiny", None, escape)) as http:
        assert_error(http.post("/tokenize", json={"messages": HI}), 400, contains=("unsafe",))
