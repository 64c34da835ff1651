"""Tool-call parsers on scripted model outputs, and streamed == whole under every chunking."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from pagellm.entrypoints.openai.tool_parsers import get_tool_parser, tool_parser_names

WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"q": "a } { ] [ \" \\ tricky", "list": [1, {"deep": [True, None]}], "ü": "日本語 ✓"}


def calls(result):
    return [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls]


def hermes_call(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args}, ensure_ascii=False)}\n</tool_call>'


# (parser, model output, expected calls, expected content)
CASES = [
    ("hermes", hermes_call("get_weather", WEATHER), [("get_weather", WEATHER)], None),
    ("hermes", "Let me check.\n" + hermes_call("a", {}) + "\n" + hermes_call("b", NESTED),
     [("a", {}), ("b", NESTED)], "Let me check."),
    ("hermes", "Plain answer, no call.", [], "Plain answer, no call."),
    ("hermes", 'x <tool_call>{"name": "f", "arguments": {"a": 1', [("f", None)], "x"),  # truncated: stands
    ("hermes", '<tool_call>{"name": "f", "argu', [], '<tool_call>{"name": "f", "argu'),
    ("hermes", "<tool_call>not json</tool_call>", [], "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {"k": 2}, "name": "late"}</tool_call>', [("late", {"k": 2})], None),
    ("hermes", 'a <tool_call>{"name": "f", "arguments": {"s": "</tool_call>"}}</tool_call> b',
     [("f", {"s": "</tool_call>"})], "ab"),
    ("llama3_json", json.dumps({"name": "get_weather", "parameters": WEATHER}), [("get_weather", WEATHER)], None),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": '
     + json.dumps(NESTED, ensure_ascii=False) + "}", [("a", {}), ("b", NESTED)], None),
    ("llama3_json", '{"answer": 42}', [], '{"answer": 42}'),
    ("llama3_json", 'The JSON is {"name": "x", "parameters": {}}', [], 'The JSON is {"name": "x", "parameters": {}}'),
    ("llama3_json", '{"name": "f", "parameters": [1]}', [], '{"name": "f", "parameters": [1]}'),
    ("mistral", "[TOOL_CALLS]" + json.dumps([{"name": "a", "arguments": WEATHER}, {"name": "b", "arguments": NESTED}]),
     [("a", WEATHER), ("b", NESTED)], None),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]g[CALL_ID]a1B2c3D4e[ARGS]{}',
     [("get_weather", {"city": "Paris"}), ("g", {})], None),
    ("mistral", "Sure. [TOOL_CALLS]broken(", [], "Sure. [TOOL_CALLS]broken("),
    ("mistral", "No tools [TOOL", [], "No tools [TOOL"),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), f(x=1, y=[None, True], z=\'\'\'a"b\'\'\')]',
     [("get_weather", WEATHER), ("f", {"x": 1, "y": [None, True], "z": 'a"b'})], None),
    ("pythonic", "[1] Smith et al.", [], "[1] Smith et al."),
    ("pythonic", "[f(x=__import__('os'))]", [], "[f(x=__import__('os'))]"),  # literals only, never eval
    ("pythonic", "[f(1)]", [], "[f(1)]"),
    ("pythonic", "[weather.get(q='日本 ) ]')]", [("weather.get", {"q": "日本 ) ]"})], None),
]


@pytest.mark.parametrize("parser,text,expected,content", CASES)
def test_scripted_outputs(parser, text, expected, content):
    result = get_tool_parser(parser)().extract(text)
    got = [(c.function.name, None if want is None else json.loads(c.function.arguments))
           for c, (_, want) in zip(result.tool_calls, expected)]
    assert got == expected
    assert len(result.tool_calls) == len(expected)
    assert result.tools_called == bool(expected)
    assert result.content == content


def test_ids_are_unique_and_openai_shaped():
    result = get_tool_parser("hermes")().extract(hermes_call("a", {}) * 20)
    ids = [c.id for c in result.tool_calls]
    assert len(set(ids)) == 20 and all(i.startswith("call_") and i[5:].isalnum() for i in ids)
    assert all(c.type == "function" for c in result.tool_calls)


def test_registry():
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(tool_parser_names())
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        get_tool_parser("nope")
    assert get_tool_parser("pagellm.entrypoints.openai.tool_parsers.hermes:HermesToolParser").names == ("hermes",)


def test_stream_deltas_shape_and_no_markup_leak():
    stream = get_tool_parser("hermes")().stream()
    text = "Hi " + hermes_call("get_weather", WEATHER)
    deltas = [d for d in (stream.feed(text[i:i + 3]) for i in range(0, len(text), 3)) if d]
    deltas += [d for d in [stream.finish()] if d]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Hi"
    frags = [t for d in deltas for t in d.tool_calls]
    assert frags[0].id and frags[0].type == "function" and frags[0].function.name == "get_weather"
    assert all(f.id is None and f.function.name is None for f in frags[1:])
    assert len(frags) > 2  # the arguments arrive in several fragments
    assert json.loads("".join(f.function.arguments or "" for f in frags)) == WEATHER
    assert deltas[0].to_dict() == {"content": "Hi"}


def stream_in_chunks(parser, text, cuts):
    stream = parser.stream()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    content = "".join(d.content or "" for d in deltas if d) or None
    args: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for d in filter(None, deltas):
        for t in d.tool_calls:
            if t.function.name is not None:
                names[t.index] = t.function.name
            args.setdefault(t.index, []).append(t.function.arguments or "")
    return content, [(names[i], "".join(args[i])) for i in sorted(names)]


PROPERTY_TEXTS = [(p, t) for p, t, _, _ in CASES] + [
    ("hermes", "<tool_call><tool_call>" + hermes_call("x", {"a": 1})[11:] + "  tail  "),
    ("llama3_json", '  {"name": "f", "parameters": {"x": 1.5e3}} ; {"oops"'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": "]"}}, {"x": 1}]'),
    ("pythonic", "[f(x=1), g(y=foo)]"),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=st.sampled_from(PROPERTY_TEXTS), data=st.data())
def test_streaming_equals_whole_for_every_chunking(case, data):
    name, text = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text))))
    parser = get_tool_parser(name)()
    whole = parser.extract(text)
    content, streamed = stream_in_chunks(parser, text, [c for c in cuts if c < len(text)])
    assert content == whole.content
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.tool_calls]


@pytest.mark.parametrize("name,text", PROPERTY_TEXTS)
def test_one_character_at_a_time(name, text):
    parser = get_tool_parser(name)()
    whole = parser.extract(text)
    content, streamed = stream_in_chunks(parser, text, list(range(1, len(text))))
    assert content == whole.content
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.tool_calls]
