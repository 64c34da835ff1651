"""Tool calls and reasoning through /v1/chat/completions, on scripted model outputs: what each
--tool-call-parser / --reasoning-parser makes of a text, whole and streamed (every way of cutting
the stream gives the same result as the whole response), through the OpenAI SDK in strict mode;
tools and tool results reach the chat template; bad tool requests are 400s.

tool_choice "required" and named functions run on a real engine too (the shared tiny random
model under the grammar): every call's arguments validate against its function's schema, and a
stream gives the same calls as the whole response."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import ScriptedEngine
from pagellm.entrypoints.openai.forced_tool_calls import required_schema
from pagellm.entrypoints.openai.server import ServerOptions, build_app

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
HI = [{"role": "user", "content": "What's the weather in Paris and the time?"}]

# Per parser: a model output calling get_weather(city="Paris") and get_time(), with content around it.
OUTPUTS = {
    "hermes": ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
               '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me look."),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
                    '"parameters": {}}', None),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {}}]', None),
    "pythonic": ('[get_weather(city="Paris"), get_time()]', None),
}
EXPECTED_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _client(engine, **options) -> openai.OpenAI:
    app = build_app(engine, "tiny", options=ServerOptions(**options))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                         http_client=TestClient(app, raise_server_exceptions=False),
                         _strict_response_validation=True)


def _tool_options(parser: str) -> dict:
    return {"tool_call_parser": parser, "enable_auto_tool_choice": True}


def _calls(tool_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls or []]


def _streamed(client, **kwargs) -> tuple[str, str, list, str]:
    """(content, reasoning, [(name, arguments)], finish_reason) assembled from a stream's deltas."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=HI, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())
    return content, reasoning, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize("parser", sorted(OUTPUTS))
def test_auto_tool_calls_whole_and_streamed(tokenizer, parser):
    text, content = OUTPUTS[parser]
    chunks = [text[i:i + 7] for i in range(0, len(text), 7)]
    client = _client(ScriptedEngine(tokenizer, chunks), **_tool_options(parser))
    whole = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME])
    message = whole.choices[0].message
    assert _calls(message.tool_calls) == EXPECTED_CALLS and message.content == content
    assert whole.choices[0].finish_reason == "tool_calls"
    assert len({c.id for c in message.tool_calls}) == 2
    streamed = _streamed(client, tools=[WEATHER, TIME])
    assert streamed == (content or "", "", EXPECTED_CALLS, "tool_calls")  # no markup leaks into content


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parser=st.sampled_from(sorted(OUTPUTS)), cuts=st.lists(st.integers(0, 200), max_size=12),
       think=st.booleans())
def test_any_stream_chunking_gives_the_whole_result(tokenizer, parser, cuts, think):
    text = ("<think>Paris, then the clock.</think>" if think else "") + OUTPUTS[parser][0]
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(points, points[1:])] or [text]
    options = dict(_tool_options(parser), reasoning_parser="qwen3")
    client = _client(ScriptedEngine(tokenizer, [text]), **options)
    whole = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME]).choices[0]
    client = _client(ScriptedEngine(tokenizer, chunks), **options)
    content, reasoning, calls, finish = _streamed(client, tools=[WEATHER, TIME])
    assert calls == _calls(whole.message.tool_calls) == EXPECTED_CALLS
    assert content == (whole.message.content or "") and finish == whole.finish_reason == "tool_calls"
    assert reasoning == (getattr(whole.message, "reasoning_content", None) or "")
    assert reasoning == ("Paris, then the clock." if think else "")


def test_reasoning_is_split_from_content(tokenizer):
    chunks = ["<thi", "nk>Two plus", " two...</th", "ink>It is 4."]
    client = _client(ScriptedEngine(tokenizer, chunks), reasoning_parser="qwen3")
    message = client.chat.completions.create(model="tiny", messages=HI).choices[0].message
    assert (message.reasoning_content, message.content) == ("Two plus two...", "It is 4.")
    assert _streamed(client)[:2] == ("It is 4.", "Two plus two...")


def test_without_parsers_the_text_is_content_and_tool_choice_none_parses_nothing(tokenizer):
    text = OUTPUTS["hermes"][0]
    client = _client(ScriptedEngine(tokenizer, [text]), **_tool_options("hermes"))
    choice = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER], tool_choice="none").choices[0]
    assert choice.message.content == text and choice.message.tool_calls is None and choice.finish_reason == "stop"


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    client = _client(ScriptedEngine(tokenizer, [OUTPUTS["hermes"][0]]), **_tool_options("hermes"))
    message = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME],
                                             parallel_tool_calls=False).choices[0].message
    assert _calls(message.tool_calls) == EXPECTED_CALLS[:1]
    assert _streamed(client, tools=[WEATHER, TIME], parallel_tool_calls=False)[2] == EXPECTED_CALLS[:1]


def test_mistral_parser_sees_special_tokens(tokenizer):
    engine = ScriptedEngine(tokenizer, [OUTPUTS["mistral"][0]])
    _client(engine, **_tool_options("mistral")).chat.completions.create(model="tiny", messages=HI, tools=[WEATHER])
    assert engine.prompts[-1][1].skip_special_tokens is False


TOOL_TEMPLATE = (
    "{% for t in tools or [] %}TOOL {{ t.function.name }};{% endfor %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments.city }}) id={{ c.id }};"
    "{% endfor %}{% if m.tool_call_id %}RESULT_FOR={{ m.tool_call_id }}{% endif %}{% endfor %}<assistant>")


def test_tools_and_tool_results_reach_the_template(tokenizer):
    engine = ScriptedEngine(tokenizer, ["It is sunny."])
    app = build_app(engine, "tiny", None, TOOL_TEMPLATE, options=ServerOptions(**_tool_options("hermes")))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0,
                           http_client=TestClient(app), _strict_response_validation=True)
    messages = HI + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].finish_reason == "stop"
    prompt = tokenizer.decode(engine.prompts[-1][0])
    assert "TOOL get_weather;" in prompt and "CALL get_weather(Paris) id=call_1;" in prompt
    assert "<tool>sunny, 21C" in prompt and "RESULT_FOR=call_1" in prompt


@pytest.mark.parametrize("body, param, code", [
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),  # no auto flags
    ({"tools": [WEATHER, WEATHER]}, "tools", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "invalid_value"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "invalid_value"),
])
def test_bad_tool_requests_are_400(tokenizer, body, param, code):
    options = {} if code == "unsupported_parameter" else _tool_options("hermes")
    app = build_app(ScriptedEngine(tokenizer, ["x"]), "tiny", options=ServerOptions(**options))
    r = TestClient(app).post("/v1/chat/completions", json={"messages": HI, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and str(error["param"]).startswith(param), error


def test_unknown_parser_names_are_refused_with_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match="available: .*hermes"):
        build_app(ScriptedEngine(tokenizer, ["x"]), "tiny", options=ServerOptions(tool_call_parser="nope"))
    with pytest.raises(ValueError, match="available: .*qwen3"):
        build_app(ScriptedEngine(tokenizer, ["x"]), "tiny", options=ServerOptions(reasoning_parser="nope"))
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        build_app(ScriptedEngine(tokenizer, ["x"]), "tiny", options=ServerOptions(enable_auto_tool_choice=True))


# -- tool_choice "required" and named functions ---------------------------------------------------
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
# Per forced choice: (tool_choice, what the grammar makes the model write, the calls, finish_reason).
FORCED = {
    "required": ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                             '{"name": "get_time", "parameters": {}}]', EXPECTED_CALLS, "tool_calls"),
    "named": (NAMED_WEATHER, '{"city": "Paris"}', EXPECTED_CALLS[:1], "stop"),  # OpenAI: "stop" for a named one
}


@pytest.mark.parametrize("kind", sorted(FORCED))
def test_forced_tool_calls_whole_and_streamed_without_auto_flags(tokenizer, kind):
    choice, text, expected, finish = FORCED[kind]
    engine = ScriptedEngine(tokenizer, [text[i:i + 5] for i in range(0, len(text), 5)])
    client = _client(engine)  # no --enable-auto-tool-choice / --tool-call-parser
    whole = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME], tool_choice=choice)
    assert _calls(whole.choices[0].message.tool_calls) == expected and whole.choices[0].message.content is None
    assert whole.choices[0].finish_reason == finish
    constraint = engine.prompts[-1][1].structured_outputs
    schema = WEATHER["function"]["parameters"] if kind == "named" else required_schema([WEATHER, TIME], True)
    assert json.loads(constraint.json) == schema and constraint.disable_any_whitespace
    assert _streamed(client, tools=[WEATHER, TIME], tool_choice=choice) == ("", "", expected, finish)


@pytest.mark.parametrize("kind", sorted(FORCED))
def test_forced_output_cut_short_shows_no_markup_as_content(tokenizer, kind):
    """max_tokens can end a forced output mid-call: the calls written so far are kept, the
    unfinished one is dropped, and nothing of the JSON reaches `content` (whole or streamed)."""
    choice, text, expected, _ = FORCED[kind]
    cut = text[:text.index('{"name": "get_time"') + 4] if kind == "required" else text[:3]
    engine = ScriptedEngine(tokenizer, [cut[i:i + 4] for i in range(0, len(cut), 4)])
    client = _client(engine)
    message = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME],
                                             tool_choice=choice).choices[0].message
    assert not message.content
    if kind == "required":  # whole calls are kept, the unfinished one dropped
        assert _calls(message.tool_calls) == expected[:1]
    else:  # the one call's arguments as far as they got, as OpenAI returns a cut call
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", cut)]
    stream = client.chat.completions.create(model="tiny", messages=HI, stream=True, tools=[WEATHER, TIME],
                                            tool_choice=choice)
    assert "".join(c.delta.content or "" for chunk in stream for c in chunk.choices) == ""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(FORCED)), cuts=st.lists(st.integers(0, 200), max_size=12), think=st.booleans())
def test_any_chunking_of_a_forced_call_gives_the_whole_result(tokenizer, kind, cuts, think):
    choice, text, expected, finish = FORCED[kind]
    text = ("<think>Paris.</think>\n" if think else "") + text
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(points, points[1:])] or [text]
    client = _client(ScriptedEngine(tokenizer, chunks), reasoning_parser="qwen3")
    whole = client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER, TIME],
                                           tool_choice=choice).choices[0]
    assert _calls(whole.message.tool_calls) == expected and whole.finish_reason == finish
    assert _streamed(client, tools=[WEATHER, TIME], tool_choice=choice) == \
        ("", "Paris." if think else "", expected, finish)


def test_constraints_start_after_the_reasoning(tokenizer):
    """Under --reasoning-parser the constraint waits for `</think>`, unless the prompt closed it."""
    end_ids = tokenizer.encode("</think>", add_special_tokens=False)
    engine = ScriptedEngine(tokenizer, ['{"city": "Paris"}'])
    client = _client(engine, reasoning_parser="deepseek_r1")
    client.chat.completions.create(model="tiny", messages=HI, tools=[WEATHER], tool_choice=NAMED_WEATHER)
    assert engine.prompts[-1][1].structured_outputs.reasoning_end_ids == end_ids
    client.chat.completions.create(model="tiny", messages=HI, response_format={"type": "json_object"})
    assert engine.prompts[-1][1].structured_outputs.reasoning_end_ids == end_ids
    closed = "{% for m in messages %}{{ m.content }}{% endfor %}<think></think>"
    app = build_app(engine, "tiny", None, closed, options=ServerOptions(reasoning_parser="qwen3"))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=TestClient(app))
    client.chat.completions.create(model="tiny", messages=HI, response_format={"type": "json_object"})
    assert engine.prompts[-1][1].structured_outputs.reasoning_end_ids is None
    client.chat.completions.create(model="tiny", messages=HI)
    assert engine.prompts[-1][1].structured_outputs is None


# On the real engine: schemas a random model cannot run away in (bounded strings and numbers).
REAL_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "plot", "parameters": {
        "type": "object", "properties": {
            "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                                       "y": {"type": "number", "minimum": 0, "maximum": 1}},
                      "required": ["x", "y"], "additionalProperties": False},
            "labels": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "visible": {"type": "boolean"}},
        "required": ["point", "labels", "visible"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "forecast", "parameters": {  # pydantic-style $defs / $ref
        "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"]}},
        "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"},
                                         "days": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 7},
                                                            {"type": "null"}]}},
        "required": ["unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters
]


def _validate_calls(tool_calls) -> list[tuple[str, dict]]:
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in REAL_TOOLS}
    calls = _calls(tool_calls)
    for name, arguments in calls:
        jsonschema.validate(arguments, schemas[name])
    assert all(c.id.startswith("call_") and c.type == "function" for c in tool_calls)
    return calls


@pytest.fixture(scope="module")
def real_client(tiny_chat_engine):
    return _client(tiny_chat_engine)


@pytest.mark.parametrize("choice", ["required", "required-one"] + [t["function"]["name"] for t in REAL_TOOLS])
def test_forced_calls_on_the_engine_validate_and_stream_the_same(real_client, tiny_chat_engine, choice):
    kwargs = dict(tools=REAL_TOOLS, temperature=0, max_tokens=120)
    if choice == "required-one":
        kwargs.update(tool_choice="required", parallel_tool_calls=False)
    elif choice == "required":
        kwargs.update(tool_choice="required")
    else:
        kwargs.update(tool_choice={"type": "function", "function": {"name": choice}})
    whole = real_client.chat.completions.create(model="tiny", messages=HI, **kwargs).choices[0]
    calls = _validate_calls(whole.message.tool_calls)
    assert whole.finish_reason == ("tool_calls" if choice.startswith("required") else "stop")
    assert whole.message.content is None and calls
    if choice == "required-one" or not choice.startswith("required"):
        assert len(calls) == 1
    if not choice.startswith("required"):
        assert calls[0][0] == choice
    assert _streamed(real_client, **kwargs) == ("", "", calls, whole.finish_reason)


def test_a_tool_schema_the_backend_refuses_is_a_400_naming_it(real_client, tiny_chat_engine):
    bad = {"type": "function", "function": {"name": "broken", "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "[unclosed"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "broken"}}):
        with pytest.raises(openai.BadRequestError) as err:
            real_client.chat.completions.create(model="tiny", messages=HI, tools=[REAL_TOOLS[0], bad],
                                                tool_choice=choice, max_tokens=20)
        assert err.value.body["param"] == "tools.1.function.parameters" and "'broken'" in err.value.message
    conflicting = {"type": "function", "function": {"name": "other", "parameters": {
        "$defs": {"Unit": {"enum": ["k"]}}, "type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        real_client.chat.completions.create(model="tiny", messages=HI, tools=[REAL_TOOLS[2], conflicting],
                                            tool_choice="required", max_tokens=20)
    assert err.value.body["param"] == "tools.1.function.parameters"
    # Nothing leaked, and the engine still serves.
    core = tiny_chat_engine._client.core
    assert core.num_free_blocks == core.num_blocks
    reply = real_client.chat.completions.create(model="tiny", messages=HI, tools=REAL_TOOLS[:1], max_tokens=120,
                                                tool_choice="required", temperature=0)
    _validate_calls(reply.choices[0].message.tool_calls)
    # Metrics: requests by constraint kind, and compile times (each distinct schema compiled once).
    metrics = {f.name: f for f in text_string_to_metric_families(tiny_chat_engine.metrics.render().decode())}
    requests = {s.labels["constraint"]: s.value for s in metrics["pagellm:structured_output_requests"].samples
                if s.name.endswith("_total")}
    compiles = next(s.value for s in metrics["pagellm:grammar_compile_seconds"].samples if s.name.endswith("_count"))
    assert requests["json"] >= 1 and compiles >= 1


# One schema per kind of rule, the last routed to llguidance by the "auto" backend (multipleOf).
RESPONSE_SCHEMAS = [
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"step": {"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 4}},
     "required": ["step"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", RESPONSE_SCHEMAS)
def test_response_format_streamed_equals_whole_and_validates(real_client, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kwargs = dict(response_format=fmt, temperature=0, max_tokens=60)
    whole = real_client.chat.completions.create(model="tiny", messages=HI, **kwargs).choices[0]
    jsonschema.validate(json.loads(whole.message.content), schema)
    assert whole.finish_reason == "stop"
    assert _streamed(real_client, **kwargs) == (whole.message.content, "", [], "stop")
