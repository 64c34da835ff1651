"""Grammar backends (xgrammar, llguidance) behind one interface, with a real tokenizer: the mask
admits every token of a valid answer and nothing that breaks it, masked random walks give
outputs that validate, bad constraints are ValueErrors naming the problem, compiles are cached."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from pagellm.structured_output import StructuredOutputsParams
from pagellm.structured_output.backend import bitmask_to_bool
from pagellm.structured_output.manager import StructuredOutputManager, make_backend

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module", params=["xgrammar", "guidance"])
def manager(request, tokenizer):
    backend = make_backend(request.param, tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    mgr = StructuredOutputManager(backend, len(tokenizer))
    yield mgr
    mgr.shutdown()


def _start(manager, rid: str, **constraint) -> None:
    manager.submit(rid, StructuredOutputsParams(**constraint))
    while not manager.is_ready(rid):
        pass
    assert manager.error(rid) is None, manager.error(rid)


def _allowed(manager, rid: str) -> torch.Tensor:
    return bitmask_to_bool(manager.fill_bitmask({rid: 0}, 1), manager.vocab_size)[0]


def _walk(manager, tokenizer, rid: str, seed: int, max_steps: int = 200) -> str:
    """A masked random "model": any allowed token, preferring EOS and short non-blank tokens so it ends."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for _ in range(max_steps):
        allowed = _allowed(manager, rid).nonzero().flatten().tolist()
        assert allowed, "the mask allows nothing"
        if eos in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return tokenizer.decode(out)
        candidates = [t for t in allowed if t != eos]
        short = [t for t in candidates if 0 < len(tokenizer.decode([t]).strip()) <= 2] or candidates
        token = rng.choice(short)
        out.append(token)
        if manager.accept(rid, [token]):
            return tokenizer.decode(out)
    raise AssertionError(f"no end within {max_steps} tokens: {tokenizer.decode(out)!r}")


ADD_TAG = {"type": "structural_tag", "triggers": ["<function="], "structures": [
    {"begin": "<function=add>", "end": "</function>",
     "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"], "additionalProperties": False}}]}


def _tags_hold(text: str) -> bool:
    """Free text, but every `<function=` opens an add call whose arguments validate."""
    for part in text.split("<function=")[1:]:
        assert part.startswith("add>") and "</function>" in part, text
        jsonschema.validate(json.loads(part[len("add>"):part.index("</function>")]), ADD_TAG["structures"][0]["schema"])
    return True


@pytest.mark.parametrize("constraint, valid, check", [
    ({"structural_tag": ADD_TAG}, 'Sure: <function=add>{"a": 3}</function> done.', _tags_hold),
    ({"json": PERSON}, '{"name": "Ann", "age": 41, "tags": ["b"]}', lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"json_object": True}, '{"k": [1, 2.5, null]}', lambda t: isinstance(json.loads(t), dict)),
    ({"regex": r"[0-9]{3}-[a-z]+"}, "123-abc", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]+", t)),
    ({"choice": ["positive", "negative", "neutral"]}, "negative", lambda t: t in ("positive", "negative", "neutral")),
])
def test_valid_answers_pass_and_walks_validate(manager, tokenizer, constraint, valid, check):
    rid = f"valid-{manager.backend.name}-{sorted(constraint)[0]}"
    _start(manager, rid, **constraint)
    for token in tokenizer.encode(valid, add_special_tokens=False):
        assert _allowed(manager, rid)[token], (valid, tokenizer.decode([token]))
        manager.accept(rid, [token])
    assert _allowed(manager, rid)[tokenizer.eos_token_id]  # complete: it may stop here
    manager.remove(rid)
    if "json_object" in constraint:
        return  # free-form keys make a random walk endless; the schema cases cover walks through JSON
    for seed in range(3):
        walk_id = f"{rid}-walk{seed}"
        _start(manager, walk_id, **constraint)
        text = _walk(manager, tokenizer, walk_id, seed)
        assert check(text), text
        manager.remove(walk_id)


def test_length_bounded_strings_are_strict_json(manager, tokenizer):
    """Inside a string with maxLength no raw control character may come (strict JSON parsers refuse
    them; xgrammar's own bounded-string rule lets them through). llguidance can still write escapes;
    on xgrammar they are masked too (its mask cache needs one repeated class; see xgrammar_backend)."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 10}}, "required": ["s"],
              "additionalProperties": False}
    rid = f"bounded-{manager.backend.name}"
    _start(manager, rid, json=schema)
    manager.accept(rid, tokenizer.encode('{"s": "a', add_special_tokens=False))
    allowed = _allowed(manager, rid)
    controls = [t for t in range(len(tokenizer)) if len(tokenizer.decode([t])) == 1 and ord(tokenizer.decode([t])) < 32]
    assert controls and not allowed[controls].any(), [tokenizer.decode([t]) for t in controls if allowed[t]]
    backslash = tokenizer.encode("\\", add_special_tokens=False)[0]
    assert tokenizer.decode([backslash]) == "\\"
    assert bool(allowed[backslash]) == (manager.backend.name == "guidance")
    escaped = '\\n\\u001f' if manager.backend.name == "guidance" else "bc"
    for token in tokenizer.encode(escaped + '"}', add_special_tokens=False):
        assert _allowed(manager, rid)[token], tokenizer.decode([token])
        manager.accept(rid, [token])
    assert _allowed(manager, rid)[tokenizer.eos_token_id]
    manager.remove(rid)


def test_tokens_that_break_the_constraint_are_masked(manager, tokenizer):
    _start(manager, "mask", regex=r"[0-9]+")
    allowed = _allowed(manager, "mask")
    for text in ("a", " ", "x1"):
        for token in tokenizer.encode(text, add_special_tokens=False)[:1]:
            assert not allowed[token], text
    assert allowed[tokenizer.encode("7", add_special_tokens=False)[0]]
    assert not allowed[tokenizer.eos_token_id]  # nothing yet: cannot stop
    manager.remove("mask")


@pytest.mark.parametrize("constraint, words", [
    ({"regex": "[ab+c"}, "regex"),
    ({"json": {"type": "objectx"}}, "json"),
    ({"grammar": "root ::= nope"}, "grammar"),
])
def test_bad_constraints_name_the_problem(manager, constraint, words):
    with pytest.raises(ValueError, match=f"the {words} constraint does not compile: .+"):
        manager.compile(StructuredOutputsParams(**constraint))
    manager.submit("bad", StructuredOutputsParams(**constraint))
    while not manager.is_ready("bad"):
        pass
    assert manager.error("bad") and "compile" in manager.error("bad")
    manager.remove("bad")


def test_a_reasoning_gate_leaves_the_output_free_until_its_end(manager, tokenizer):
    end = tokenizer.encode("</think>", add_special_tokens=False)
    assert len(end) > 1  # SmolLM2 has no <think> token: the gate spans tokens
    yes = tokenizer.encode("yes", add_special_tokens=False)
    for rid, feeds in ((f"gate-{manager.backend.name}", [[t] for t in end] + [yes]),  # one token a step
                       (f"gate1-{manager.backend.name}", [end + yes])):  # the gate and the answer in one accept
        _start(manager, rid, choice=["yes", "no"], reasoning_end_ids=end)
        assert not manager.is_constraining(rid)
        # Reasoning the grammar would refuse, with a false start of the tag in it.
        assert manager.accept(rid, tokenizer.encode("Hmm, </thin no. <", add_special_tokens=False)) is False
        assert not manager.is_constraining(rid)
        done = [manager.accept(rid, ids) for ids in feeds]
        assert manager.is_constraining(rid) and not any(done[:-1])
        assert done[-1] or _allowed(manager, rid)[tokenizer.eos_token_id]  # "yes" was taken as the answer
        manager.remove(rid)
    _start(manager, "gate-mask", choice=["yes", "no"], reasoning_end_ids=end)
    manager.accept("gate-mask", end)
    allowed = _allowed(manager, "gate-mask")
    assert allowed[yes[0]] and not allowed[tokenizer.encode("Hmm", add_special_tokens=False)[0]]
    manager.remove("gate-mask")


def test_structural_tag_spellings(manager, tokenizer):
    """xgrammar's own format; a triggered_tags format both take; a tree only xgrammar compiles."""
    triggered = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f="], "tags": [
        {"begin": "<f=a>", "content": {"type": "json_schema", "json_schema": {"type": "object"}}, "end": "</f>"}]}}
    manager.compile(StructuredOutputsParams(structural_tag=triggered))
    tree = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Answer: "}, {"type": "json_schema", "json_schema": {"type": "integer"}}]}}
    if manager.backend.name == "xgrammar":
        manager.compile(StructuredOutputsParams(structural_tag=tree))
    else:
        with pytest.raises(ValueError, match="xgrammar backend compiles any format"):
            manager.compile(StructuredOutputsParams(structural_tag=tree))
    _start(manager, "tag-mask", structural_tag=ADD_TAG)
    assert _allowed(manager, "tag-mask")[tokenizer.encode("Hello", add_special_tokens=False)[0]]  # free text
    manager.accept("tag-mask", tokenizer.encode('x <function=add>{"', add_special_tokens=False))
    allowed = _allowed(manager, "tag-mask")  # inside the tag: only the schema's key
    assert allowed[tokenizer.encode("a", add_special_tokens=False)[0]]
    assert not allowed[tokenizer.encode("b", add_special_tokens=False)[0]]
    manager.remove("tag-mask")
    off_trigger = {**ADD_TAG, "triggers": ["<call="]}
    with pytest.raises(ValueError, match="starts with none of the triggers"):
        manager.compile(StructuredOutputsParams(structural_tag=off_trigger))


# Keywords xgrammar compiles but drops: an instance that breaks only that keyword, and one that keeps it.
DROPPED_BY_XGRAMMAR = [
    ({"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 9}, "0.3", "1.5"),
    ({"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True, "maxItems": 2}, "[1,1]", "[1,2]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
      "dependentRequired": {"a": ["b"]}, "additionalProperties": False}, '{"a":1}', '{"a":1,"b":2}'),
    ({"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 3}}, "3", "4"),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"a":1}', None),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}},
      "required": ["s"], "additionalProperties": False}, '{"s":"abcdef"}', '{"s":"abc"}'),
    ({"type": "string", "format": "iri"}, '"x y"', None),
]


def _accepts(manager, tokenizer, rid: str, schema: dict, text: str) -> bool:
    manager.submit(rid, StructuredOutputsParams(json=schema))
    while not manager.is_ready(rid):
        pass
    ok = manager.error(rid) is None and all(
        _allowed(manager, rid)[t] and (manager.accept(rid, [t]) or True)
        for t in tokenizer.encode(text, add_special_tokens=False))
    ok = ok and bool(_allowed(manager, rid)[tokenizer.eos_token_id])
    manager.remove(rid)
    return ok


@pytest.mark.parametrize("schema, breaks, keeps", DROPPED_BY_XGRAMMAR)
def test_keywords_xgrammar_would_drop_are_refused_or_routed_to_llguidance(tokenizer, manager, schema, breaks, keeps):
    """xgrammar alone refuses them (naming the keyword); "auto" sends them to llguidance, which
    enforces them (an instance breaking only that keyword is masked out) or refuses them too."""
    from pagellm.structured_output.auto_backend import unenforced_by_xgrammar

    [where] = unenforced_by_xgrammar(schema)
    if manager.backend.name == "xgrammar":
        with pytest.raises(ValueError, match=f"xgrammar does not enforce {re.escape(where)}; use"):
            manager.compile(StructuredOutputsParams(json=schema))
        return
    auto = StructuredOutputManager(make_backend("auto", tokenizer, len(tokenizer), [tokenizer.eos_token_id]),
                                   len(tokenizer))
    try:
        for mgr in (manager, auto):  # llguidance itself, then through auto
            try:
                mgr.compile(StructuredOutputsParams(json=schema))
            except ValueError as exc:
                assert any(w in str(exc) for w in ("Unimplemented keys", "not supported", "Unknown format")), exc
                assert mgr is manager or where in str(exc), exc  # auto says xgrammar would drop it too
                continue
            rid = f"dropped-{mgr.backend.name}-{where}"
            assert not _accepts(mgr, tokenizer, rid, schema, breaks), breaks
            assert keeps is None or _accepts(mgr, tokenizer, rid, schema, keeps), keeps
    finally:
        auto.shutdown()


def test_auto_keeps_xgrammar_for_what_it_enforces(tokenizer):
    auto = make_backend("auto", tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    backend, _ = auto.compile(StructuredOutputsParams(json=PERSON))
    assert backend.name == "xgrammar" and auto._guidance is None  # llguidance not even loaded
    backend, _ = auto.compile(StructuredOutputsParams(json=DROPPED_BY_XGRAMMAR[0][0]))
    assert backend.name == "guidance"


def test_compiles_are_cached_by_constraint(manager):
    before = manager.num_compiles
    for _ in range(3):
        manager.compile(StructuredOutputsParams(json=PERSON))
        manager.compile(StructuredOutputsParams(json=json.dumps(PERSON)))  # the same text
    assert manager.num_compiles - before <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"json": PERSON, "regex": "a"}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"choice": []}, "non-empty"),
    ({"choice": ["a", ""]}, "non-empty"),
    ({"regex": ""}, "non-empty"),
    ({"regex": "a", "reasoning_end_ids": []}, "reasoning_end_ids"),
    ({"regex": "a", "reasoning_end_ids": [1, -2]}, "reasoning_end_ids"),
])
def test_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_unknown_backend_lists_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match="available: auto, xgrammar, guidance"):
        make_backend("outlines", tokenizer, len(tokenizer), [])
