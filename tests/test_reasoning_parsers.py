"""Reasoning parsers on scripted outputs, and streamed == whole under every chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pagellm.entrypoints.openai.reasoning import get_reasoning_parser, reasoning_parser_names

CASES = [
    ("deepseek_r1", "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "\n\nThe answer is 4."),
    ("deepseek_r1", "Reasoning without the opening tag</think>Answer", "Reasoning without the opening tag", "Answer"),
    ("deepseek_r1", "Cut off while thinking </th", "Cut off while thinking </th", None),
    ("deepseek_r1", "a</think>b</think>c", "a", "b</think>c"),
    ("deepseek_r1", "日本語で考える</think>答え ✓", "日本語で考える", "答え ✓"),
    ("qwen3", "<think>step 1, step 2</think>\n\nDone.", "step 1, step 2", "\n\nDone."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
    ("qwen3", "Text then </think> is content", None, "Text then </think> is content"),
    ("qwen3", "  <think>x</think>y", "x", "y"),
    ("qwen3", "<think>truncated", "truncated", None),
    ("qwen3", "<thin", None, "<thin"),
    ("qwen3", "<think></think>", None, None),
]


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_scripted_outputs(name, text, reasoning, content):
    assert get_reasoning_parser(name)().extract(text) == (reasoning, content)


def stream_in_chunks(parser, text, cuts):
    stream = parser.stream()
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [d for d in [*(stream.feed(p) for p in pieces), stream.finish()] if d]
    reasoning = "".join(d.reasoning_content or "" for d in deltas) or None
    content = "".join(d.content or "" for d in deltas) or None
    return reasoning, content


@settings(max_examples=80, deadline=None, derandomize=True)
@given(case=st.sampled_from([(n, t) for n, t, _, _ in CASES]), data=st.data())
def test_streaming_equals_whole_for_every_chunking(case, data):
    name, text = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text))))
    parser = get_reasoning_parser(name)()
    assert stream_in_chunks(parser, text, [c for c in cuts if c < len(text)]) == parser.extract(text)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(name=st.sampled_from(["deepseek_r1", "qwen3"]),
       text=st.lists(st.sampled_from(["<think>", "</think>", "<", "</th", "ink>", "a", " ", "\n", "é"]),
                     max_size=12).map("".join),
       data=st.data())
def test_streaming_equals_whole_on_tag_soup(name, text, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text))))
    parser = get_reasoning_parser(name)()
    whole = parser.extract(text)
    assert stream_in_chunks(parser, text, [c for c in cuts if c < len(text)]) == whole
    assert whole == reference_split(name, text)


def reference_split(name, text):
    """The rule written with str methods: an oracle independent of the character machine."""
    rest = text.lstrip()
    if rest.startswith("<think>"):
        text = rest[len("<think>"):]
    elif name == "qwen3":
        return None, text or None
    reasoning, _, content = text.partition("</think>")
    return reasoning or None, content or None


def test_stream_deltas_hold_split_tags():
    stream = get_reasoning_parser("qwen3")().stream()
    assert stream.feed("<th") is None
    assert stream.feed("ink>abc</") .reasoning_content == "abc"
    assert not stream.reasoning_ended
    assert stream.feed("think>ok").to_dict() == {"content": "ok"}
    assert stream.reasoning_ended


class CharTokenizer:
    """One id per character: enough to test the token-id query without a model."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_reasoning_ended_on_text_and_ids():
    parser = get_reasoning_parser("deepseek_r1")(tokenizer=CharTokenizer())
    assert not parser.reasoning_ended("still thinking")
    assert parser.reasoning_ended("done</think>now")
    assert parser.reasoning_ended([ord(c) for c in "x</think>"])
    assert not parser.reasoning_ended([ord(c) for c in "x</thin"])
    with pytest.raises(ValueError, match="tokenizer"):
        get_reasoning_parser("qwen3")().reasoning_ended([1, 2, 3])


def test_registry():
    assert reasoning_parser_names() == ["deepseek_r1", "qwen3"]
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")
