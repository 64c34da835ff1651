"""The OpenAI-compatible server end to end: a real `pagellm serve` subprocess (engine core in its
own process) on a free loopback port, driven with the official `openai` SDK in strict mode.

Expected texts come from `pagellm.LLM` in this process (same weights, greedy), so the server
is checked against the offline API rather than against itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pagellm
from pagellm import SamplingParams
from pagellm.benchmarks.server_process import ServerProcess

pytestmark = pytest.mark.slow

NAME = "smollm"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def server(smollm_path, request):
    proc = ServerProcess([smollm_path, "--served-model-name", NAME, "--kv-cache-memory", str(64 << 20),
                          "--max-model-len", str(MAX_MODEL_LEN)])
    proc.launch()
    try:
        request.getfixturevalue("smollm_llm")  # load the in-process reference while the server loads
        proc.wait_ready()
        yield proc
    finally:
        status = proc.stop()
        log = proc.log()
        proc.close()
    assert status == 0, f"the server did not exit cleanly on SIGTERM (status {status}):\n{log}"


def client(server, strict: bool = True) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120,
                         _strict_response_validation=strict)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def metric_values(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, sample.value)
    return values


# -- 1. non-streaming text equals LLM.generate / LLM.chat ------------------------------------------------
def test_completion_matches_llm_generate(server, smollm_llm):
    prompt = "The capital of France is"
    expected = smollm_llm.generate(prompt, greedy(16), use_tqdm=False)[0]
    resp = client(server).completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    choice = resp.choices[0]
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.model == NAME
    assert abs(resp.created - time.time()) < 120
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_matches_llm_chat(server, smollm_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = smollm_llm.chat(messages, greedy(24), use_tqdm=False)[0]
    resp = client(server).chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == NAME
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_list_of_prompts_and_token_id_prompts(server, smollm_llm):
    prompts = ["The sky is", "def add(a, b):"]
    expected = [o.outputs[0].text for o in smollm_llm.generate(prompts, greedy(8), use_tqdm=False)]
    resp = client(server).completions.create(model=NAME, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == expected
    ids = smollm_llm.get_tokenizer()(prompts[1]).input_ids
    by_ids = client(server).completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == expected[1]


def test_request_ids_are_unique(server):
    c = client(server)
    ids = {c.completions.create(model=NAME, prompt="Hello", max_tokens=1).id for _ in range(3)}
    ids |= {c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1).id
            for _ in range(2)}
    assert len(ids) == 5


def test_omitted_max_tokens_fills_the_context(server):
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(MAX_MODEL_LEN - 6)]
    resp = client(server).completions.create(model=NAME, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens == MAX_MODEL_LEN - 6
    assert resp.usage.completion_tokens == 6
    assert resp.choices[0].finish_reason == "length"


# -- 2. streaming -----------------------------------------------------------------------------------------
def test_completion_stream_concatenates_to_full_text(server):
    kwargs = dict(model=NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    full = client(server).completions.create(**kwargs)
    # The SDK types `finish_reason` as never null, but OpenAI (and vLLM) stream null until the last
    # chunk, so strict validation would reject every mid-stream chunk: this one call is lenient.
    chunks = list(client(server, strict=False).completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_completion_stream_many_prompts_n2_with_logprobs(server):
    body = {"model": NAME, "prompt": ["The sky is", "Water is"], "n": 2, "max_tokens": 6, "temperature": 0,
            "logprobs": 1}
    full = httpx.post(server.base_url + "/completions", json=body, timeout=60).json()
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line[len("data: "):])["choices"]:
            i = choice["index"]
            texts[i] = texts.get(i, "") + choice["text"]
            tokens.setdefault(i, []).extend(choice["logprobs"]["tokens"])
            offsets.setdefault(i, []).extend(choice["logprobs"]["text_offset"])
    assert sorted(texts) == [0, 1, 2, 3]  # prompt-major: prompt 0's two choices, then prompt 1's
    assert [texts[i] for i in range(4)] == [c["text"] for c in full["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy
    for i in range(4):
        assert tokens[i] == full["choices"][i]["logprobs"]["tokens"]
        assert offsets[i] == full["choices"][i]["logprobs"]["text_offset"]


def test_chat_stream_concatenates_to_full_text_with_usage(server):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=20,
                  temperature=0)
    full = client(server).chat.completions.create(**kwargs)
    chunks = list(client(server).chat.completions.create(**kwargs, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)
    # The second identical prompt is served from the prefix cache built by the first.
    assert streamed.prompt_tokens_details.cached_tokens == (full.usage.prompt_tokens - 1) // 16 * 16


def test_stream_without_include_usage_has_no_usage(server):
    chunks = list(client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True))
    assert chunks and all(c.usage is None and c.choices for c in chunks)


def test_chat_stream_n2_streams_two_indexed_choices(server):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16,
                  temperature=1.0, seed=1234, n=2)
    full = client(server).chat.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    roles = set()
    for chunk in client(server).chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.delta.role:
                roles.add(choice.index)
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1] and roles == {0, 1} and sorted(finished) == [0, 1]
    # Seeded sampling is reproducible, so the streamed choices equal the whole ones.
    assert [texts[0], texts[1]] == [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]


# -- 3. concurrency ---------------------------------------------------------------------------------------------
def test_32_concurrent_streams_complete_with_correct_text(server, smollm_llm):
    conversations = [[{"role": "user", "content": f"What is {i} plus {i + 3}?"}] for i in range(32)]
    expected = [o.outputs[0].text for o in smollm_llm.chat(conversations, greedy(12), use_tqdm=False)]

    async def one(c: openai.AsyncOpenAI, messages) -> str:
        stream = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300,
                                      _strict_response_validation=True) as c:
            return await asyncio.gather(*(one(c, m) for m in conversations))

    assert asyncio.run(run_all()) == expected


# -- 4. client disconnects abort and free everything ---------------------------------------------------------------
def _wait_idle(server, within: float) -> tuple[float, dict]:
    start = time.monotonic()
    while True:
        values = metric_values(server)
        if values.get("pagellm:num_requests_running") == 0 and values.get("pagellm:kv_cache_usage_perc") == 0:
            return time.monotonic() - start, values
        if time.monotonic() - start > within:
            return time.monotonic() - start, values
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/completions", json=body) as response:
            assert response.status_code == 200
            lines = []
            # Held on purpose: a line iterator dropped at `break` closes the connection whenever it is collected,
            # which the server rightly takes for a disconnect (it made this test flaky).
            reader = response.iter_lines()
            for line in reader:
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 3:
                    break
            during = metric_values(server)  # the request holds a slot and KV blocks while it streams
            assert during["pagellm:num_requests_running"] == 1 and during["pagellm:kv_cache_usage_perc"] > 0, \
                (during, lines)
    took, after = _wait_idle(server, within=1.0)
    assert after["pagellm:num_requests_running"] == 0 and after["pagellm:kv_cache_usage_perc"] == 0, (took, after)


def test_disconnect_while_waiting_for_a_whole_response_aborts(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, timeout=1.5)
    took, after = _wait_idle(server, within=1.0)
    assert after["pagellm:num_requests_running"] == 0 and after["pagellm:kv_cache_usage_perc"] == 0, (took, after)


# -- logprobs and echo ---------------------------------------------------------------------------------------------
def test_completion_echo_with_logprobs(server, smollm_llm):
    prompt = "The quick brown fox"
    ref = smollm_llm.generate(prompt, greedy(6, logprobs=2, prompt_logprobs=2), use_tqdm=False)[0]
    # Raw HTTP: the first prompt token has no logprob (null), which the SDK's types do not allow for.
    body = {"model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 2}
    resp = httpx.post(server.base_url + "/completions", json=body, timeout=60).json()
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    n_prompt, n_gen = len(ref.prompt_token_ids), len(ref.outputs[0].token_ids)
    assert choice["text"] == prompt + ref.outputs[0].text
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + n_gen
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, n_prompt):  # the prompt's logprobs are the offline API's
        token_id = ref.prompt_token_ids[i]
        assert lp["token_logprobs"][i] == pytest.approx(ref.prompt_logprobs[i][token_id].logprob, abs=1e-3)
    for i in range(n_prompt, n_prompt + n_gen):  # greedy: the chosen token is the most likely one
        top = lp["top_logprobs"][i]
        assert 2 <= len(top) <= 3
        assert lp["token_logprobs"][i] == pytest.approx(max(top.values()))
    # echo + logprobs needs prompt logprobs, which bypass the prefix cache: nothing is reported cached.
    assert resp["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_echo_with_zero_max_tokens_scores_the_prompt(server):
    body = {"model": NAME, "prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1}
    resp = httpx.post(server.base_url + "/completions", json=body, timeout=60).json()
    choice = resp["choices"][0]
    assert choice["text"] == "Hello there"
    assert len(choice["logprobs"]["tokens"]) == resp["usage"]["prompt_tokens"]
    assert resp["usage"]["completion_tokens"] == 0


def test_chat_logprobs(server):
    resp = client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    tokens = [t.token for t in content]
    if resp.choices[0].finish_reason == "stop":  # the end-of-turn token counts but is not in the text
        tokens = tokens[:-1]
    assert "".join(tokens) == resp.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        logprobs = [t.logprob for t in entry.top_logprobs]
        assert logprobs == sorted(logprobs, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode("utf-8"))


# -- models, metadata, tokenizer ------------------------------------------------------------------------------------
def test_models_version_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client(server).models.retrieve(NAME).id == NAME
    raw = httpx.get(server.base_url + "/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/version").json() == {"version": pagellm.__version__}
    assert httpx.get(server.url + "/health").status_code == 200


def test_tokenize_detokenize_and_tokenizer_info(server, smollm_llm):
    tok = smollm_llm.get_tokenizer()
    text = "Hello, world! pagellm serves."
    got = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert got["tokens"] == tok(text).input_ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == MAX_MODEL_LEN
    assert got["token_strs"] == tok.convert_ids_to_tokens(got["tokens"])
    assert httpx.post(server.url + "/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = httpx.post(server.url + "/tokenize", json={"model": NAME, "messages": messages}).json()
    expected_ids = smollm_llm.chat(messages, greedy(1), use_tqdm=False)[0].prompt_token_ids
    assert chat["tokens"] == expected_ids

    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template
    assert info["eos_token"] == tok.eos_token and tok.eos_token in info["special_tokens"]


def test_metrics_are_prometheus_text(server):
    client(server).completions.create(model=NAME, prompt="Hi", max_tokens=2)
    values = metric_values(server)
    assert values["pagellm:num_requests_running"] == 0
    assert "pagellm:num_requests_waiting" in values
    assert values["pagellm:kv_cache_usage_perc"] == 0


# -- prefix caching ------------------------------------------------------------------------------------------------
def _cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_prefix_cache_usage_salt_reset_and_metrics(server):
    prompt = "Prefix caching over HTTP: a long shared system prompt that many requests repeat, " * 2
    c = client(server)
    _wait_idle(server, within=10.0)
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=10).status_code == 200
    before = metric_values(server)
    first = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    n = first.usage.prompt_tokens
    cached = (n - 1) // 16 * 16  # whole 16-token blocks, leaving the last prompt token to compute
    assert cached >= 16
    assert (_cached(first.usage), _cached(second.usage)) == (0, cached)
    assert second.choices[0].text == first.choices[0].text
    # A salted request shares nothing with unsalted ones, only with the same salt.
    salted = [c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0,
                                   extra_body={"cache_salt": "tenant-a"}) for _ in range(2)]
    assert [_cached(r.usage) for r in salted] == [0, cached]
    assert salted[0].choices[0].text == first.choices[0].text
    # Chat, streamed: the final usage chunk carries the cached count.
    messages = [{"role": "user", "content": prompt}]
    counts = []
    for _ in range(2):
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        counts.append((_cached(usage), usage.prompt_tokens))
    assert counts[0][0] == 0 and counts[1][0] == (counts[1][1] - 1) // 16 * 16 > 0
    after = metric_values(server)
    queries = after["pagellm:prefix_cache_queries_total"] - before.get("pagellm:prefix_cache_queries_total", 0)
    hits = after["pagellm:prefix_cache_hits_total"] - before.get("pagellm:prefix_cache_hits_total", 0)
    assert queries == 4 * n + 2 * counts[0][1]
    assert hits == 2 * cached + counts[1][0]
    # After a reset nothing is cached; a bad salt is a 400 naming the field.
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=10).status_code == 200
    again = c.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert _cached(again.usage) == 0
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=NAME, prompt=prompt, max_tokens=2, extra_body={"cache_salt": ""})
    assert err.value.body["param"] == "cache_salt"


def test_reset_prefix_cache_is_refused_while_requests_run(server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/completions", json=body) as response:
            lines = response.iter_lines()  # kept alive: closing it would close the connection (an abort)
            while not next(lines).startswith("data: "):
                pass  # the first chunk: generating, so the request holds KV blocks
            refused = http.post(server.url + "/reset_prefix_cache")
            assert next(lines) is not None  # still streaming
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "engine_busy"
    _wait_idle(server, within=10.0)
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=10).status_code == 200


# -- 7. structured outputs -----------------------------------------------------------------------------------------
def test_structured_outputs_through_the_sdk(server):
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        country: str = pydantic.Field(max_length=20)

    c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, _strict_response_validation=True)
    messages = [{"role": "user", "content": "Name a city in Europe as JSON."}]
    parsed = c.chat.completions.parse(model=NAME, messages=messages, response_format=City, temperature=0,
                                      max_tokens=60)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name and parsed.choices[0].finish_reason == "stop"
    # Streamed equals whole (greedy); completions take vLLM's structured_outputs field.
    fmt = {"type": "json_schema", "json_schema": {"name": "City", "schema": City.model_json_schema()}}
    stream = c.chat.completions.create(model=NAME, messages=messages, response_format=fmt, temperature=0,
                                       max_tokens=60, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == \
        parsed.choices[0].message.content
    text = c.completions.create(model=NAME, prompt="The answer is", max_tokens=10, temperature=0,
                                extra_body={"structured_outputs": {"choice": ["yes", "no"]}}).choices[0].text
    assert text in ("yes", "no")
    for bad in ({"regex": "[unclosed"}, {"json": {"type": "nonsense"}}, {"regex": "a", "choice": ["b"]}, {"x": 1}):
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"structured_outputs": bad})
        assert err.value.status_code == 400 and err.value.code == "invalid_value"
    _wait_idle(server, within=10.0)
