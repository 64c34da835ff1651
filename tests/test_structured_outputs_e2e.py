"""Structured outputs through the engine: SmolLM2 (greedy) under JSON schemas, regex, choice and a
grammar always gives output that parses and validates, and ends with "stop"; constrained and
unconstrained requests share batches; n > 1 and preemption keep the constraint; a constraint
with a reasoning end starts after it; a bad constraint is a ValueError before anything is queued;
the guidance backend on a tiny model likewise (with the schemas of forced tool choices)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from types import SimpleNamespace

import jsonschema
import pytest

from pagellm import SamplingParams
from pagellm.entrypoints.openai.forced_tool_calls import forced_constraint
from pagellm.structured_output import StructuredOutputsParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                      "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
     "required": ["city", "population"]},
    {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["ok", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"cat": {"type": "string", "maxLength": 6}}, "required": ["cat"],
                "additionalProperties": False},
               {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"],
                "additionalProperties": False}]},
    {"type": "object", "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 16},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "genre": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["title", "year", "genre"], "additionalProperties": False},
]
PROMPT = "Answer with JSON only. Describe something:"


# 40 schemas for a random model: every object closed and every value bounded, so a grammar-masked
# random walk ends (an unbounded number or an open object can run to max_tokens).
def _obj(props, required=None):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _S(n):
    return {"type": "string", "maxLength": n}


def _I(lo, hi):
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _E(*values):
    return {"enum": list(values)}


BOUNDED_SCHEMAS = [
    _obj({"name": _S(8)}),
    _obj({"age": _I(0, 120)}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": _E("red", "green", "blue")}),
    _obj({"name": _S(6), "age": _I(1, 99)}),
    _obj({"name": _S(6), "nick": _S(4)}, required=["name"]),  # optional property
    _obj({"level": _E(1, 2, 3), "tag": {"const": "x"}}),
    _obj({"point": _obj({"x": _I(-9, 9), "y": _I(-9, 9)})}),
    _obj({"a": _obj({"b": _obj({"c": _E("deep")})})}),  # three levels
    _obj({"items": {"type": "array", "items": _I(0, 9), "minItems": 1, "maxItems": 3}}),
    _obj({"tags": {"type": "array", "items": _E("a", "b"), "minItems": 2, "maxItems": 2}}),
    _obj({"pairs": {"type": "array", "items": _obj({"k": _E("p", "q"), "v": _I(0, 5)}), "maxItems": 2}}),
    _obj({"matrix": {"type": "array", "items": {"type": "array", "items": _I(0, 1), "minItems": 2, "maxItems": 2},
                    "minItems": 2, "maxItems": 2}}),
    {"type": "array", "items": _S(5), "minItems": 1, "maxItems": 2},
    {"type": "array", "items": _E(True, False, None), "maxItems": 3},
    _obj({"v": {"anyOf": [_I(0, 9), {"type": "null"}]}}),
    _obj({"v": {"anyOf": [_obj({"cat": _S(4)}), _obj({"dog": _I(0, 9)})]}}),
    {"anyOf": [_obj({"kind": {"const": "a"}, "n": _I(0, 3)}), _obj({"kind": {"const": "b"}, "s": _S(3)})]},
    _obj({"v": {"type": ["string", "null"], "maxLength": 5}}),
    _obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}),
    _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    _obj({"word": {"type": "string", "pattern": "^[a-z]{2,4}$"}}),
    _obj({"day": {"type": "string", "format": "date"}}),
    _obj({"id": {"type": "string", "format": "uuid"}}),
    _obj({"ip": {"type": "string", "format": "ipv4"}}),
    _obj({"score": {"type": "integer", "minimum": 10, "maximum": 20}}),
    _obj({"neg": {"type": "integer", "minimum": -100, "maximum": -50}}),
    _obj({"big": {"type": "integer", "minimum": 1000, "maximum": 1005}}),
    _obj({"exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    _obj({"unit": {"$ref": "#/$defs/Unit"}, "n": _I(0, 9)}) | {"$defs": {"Unit": _E("kg", "lb")}},
    _obj({"owner": {"$ref": "#/$defs/Person"}}) | {"$defs": {"Person": _obj({"name": _S(5), "age": _I(0, 99)})}},
    _obj({"status": _E("open", "closed"), "count": _I(0, 3), "flag": {"type": "boolean"}, "note": _S(3)}),
    _obj({"title": {"type": "string", "minLength": 1, "maxLength": 6}, "year": _I(1900, 2100)}),
    _obj({"empty": _obj({})}),
    _obj({"list": {"type": "array", "items": _obj({"id": _I(0, 9)}), "minItems": 1, "maxItems": 2}}),
    _obj({"choice": {"oneOf": [_E("x"), _E("y")]}}),
    _obj({"lang": _E("en", "fr", "de"), "words": {"type": "array", "items": _S(4), "maxItems": 2}}),
    _obj({"a": _I(0, 1), "b": _I(0, 1), "c": _I(0, 1), "d": _I(0, 1), "e": _I(0, 1)}),
    _obj({"nested": {"type": "array", "items": _obj({"tags": {"type": "array", "items": _E("t"), "maxItems": 1}}),
                    "maxItems": 2}}),
    _E("alpha", "beta", 3, None),
]



def _params(max_tokens: int = 80, **constraint) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**constraint))


def test_json_schemas_always_validate_and_share_a_batch(smollm_llm):
    prompts = [PROMPT] * len(SCHEMAS) + ["The capital of France is"]
    # Compact JSON: with free whitespace, greedy SmolLM2-135M falls into newline runs between tokens.
    params = [_params(json=s, disable_any_whitespace=True) for s in SCHEMAS] + [SamplingParams(temperature=0.0, max_tokens=8)]
    outs = smollm_llm.generate(prompts, params, use_tqdm=False)
    for schema, out in zip(SCHEMAS, outs):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    alone = smollm_llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8),
                                use_tqdm=False)
    assert outs[-1].outputs[0].token_ids == alone[0].outputs[0].token_ids  # the unconstrained row is untouched


@pytest.mark.parametrize("constraint, check", [
    ({"regex": r"(yes|no), because [a-z ]{1,20}\."}, lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,20}\.", t)),
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"grammar": 'root ::= "(" [0-9]+ (" + " [0-9]+)* ")"'}, lambda t: re.fullmatch(r"\([0-9]+( \+ [0-9]+)*\)", t)),
    ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_choice_grammar_and_any_json(smollm_llm, constraint, check):
    prompt = 'Answer in JSON with the keys "answer" and "reason". Is the sky blue?' if "json_object" in constraint \
        else "Is the sky blue? Answer:"
    out = smollm_llm.generate([prompt], _params(max_tokens=60, **constraint), use_tqdm=False)[0]
    text = out.outputs[0].text
    assert check(text) and out.outputs[0].finish_reason == "stop", text


def test_n_samples_and_preemption_keep_the_constraint(tiny_chat_model):
    from pagellm import LLM

    # 17 blocks of 16 tokens (512 bytes a token: 2 layers x K,V x 2 KV heads x 16 dims x fp32) for 6
    # sequences after two ~100-token prompts: they preempt each other while decoding.
    llm = LLM(tiny_chat_model, max_model_len=256, kv_cache_memory=17 * 16 * 512, max_num_seqs=6, quiet=True)
    schema = SCHEMAS[4]
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    outs = llm.generate(["hello world " * 50, "good morning " * 50], params, use_tqdm=False)
    for out in outs:
        for completion in out.outputs:
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), schema)
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions_total > 0 and core.num_free_blocks == core.num_blocks


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_chunked_prefill_and_preemption_leave_constrained_greedy_output_unchanged(tiny_chat_model, backend):
    """Prompts longer than the step's 32-token budget are prefilled in chunks (no token is sampled,
    so no grammar advances, until the last chunk) while the small pool preempts decodes: the
    constrained greedy tokens equal a run with whole prefills and room for everything."""
    from pagellm import LLM

    prompts = [f"record {i}: " + "hello world " * 30 for i in range(6)]  # 65 tokens each
    params = _bounded_params(max_tokens=60)[:6]
    roomy = LLM(tiny_chat_model, max_model_len=128, kv_cache_memory=8 << 20, max_num_batched_tokens=256,
                structured_outputs_backend=backend, quiet=True)
    # 8 blocks of 16 tokens (512 bytes a token) for six 65-token prompts: they preempt each other.
    tight = LLM(tiny_chat_model, max_model_len=128, kv_cache_memory=8 * 16 * 512, max_num_seqs=6,
                max_num_batched_tokens=32, structured_outputs_backend=backend, quiet=True)
    want = [o.outputs[0] for o in roomy.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0] for o in tight.generate(prompts, params, use_tqdm=False)]
    _assert_valid(BOUNDED_SCHEMAS[:6], got)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    core = tight.llm_engine.core
    assert core.scheduler.num_preemptions_total > 0 and core.num_free_blocks == core.num_blocks


def test_guidance_backend(tiny_chat_model):
    from pagellm import LLM

    llm = LLM(tiny_chat_model, max_model_len=256, kv_cache_memory=8 << 20, structured_outputs_backend="guidance",
              quiet=True)
    params = [_params(max_tokens=100, json=SCHEMAS[1], disable_any_whitespace=True), _params(regex=r"[0-9]{4}"),
              _params(choice=["x", "y"]), _params(grammar='start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]/')]  # Lark
    # Closed objects of bounded values: under llguidance a random model adds keys where additionalProperties
    # is unset and writes endless decimals.
    city = {**SCHEMAS[1], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": name, "parameters": schema}}
             for name, schema in (("f", SCHEMAS[4]), ("g", city))]
    required = forced_constraint(tools, None, parallel=False)
    named = forced_constraint(tools, "g", parallel=True)
    params += [_params(max_tokens=100, **required), _params(max_tokens=100, **named)]
    outs = llm.generate(["a", "b", "c", "d", "e", "f"], params, use_tqdm=False)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMAS[1])
    assert re.fullmatch(r"[0-9]{4}", outs[1].outputs[0].text) and outs[2].outputs[0].text in ("x", "y")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"\([0-9](\+[0-9])?\)", outs[3].outputs[0].text)
    [call] = json.loads(outs[4].outputs[0].text)  # tool_choice "required" with parallel_tool_calls=false
    jsonschema.validate(call["parameters"], {"f": SCHEMAS[4], "g": city}[call["name"]])
    jsonschema.validate(json.loads(outs[5].outputs[0].text), city)  # named "g"
    _check_reasoning_gate(llm, "hello")
    outs = llm.generate([f"item {i}:" for i in range(len(BOUNDED_SCHEMAS))], _bounded_params(), use_tqdm=False)
    _assert_valid(BOUNDED_SCHEMAS, [o.outputs[0] for o in outs])


def _assert_valid(schemas, completions) -> None:
    for i, (schema, completion) in enumerate(zip(schemas, completions)):
        assert completion.finish_reason == "stop", (i, completion.text)
        jsonschema.validate(json.loads(completion.text), schema, format_checker=jsonschema.FormatChecker())


def _bounded_params(max_tokens: int = 100) -> list[SamplingParams]:
    return [_params(max_tokens=max_tokens, json=s, disable_any_whitespace=True) for s in BOUNDED_SCHEMAS]


def test_forty_schemas_validate_on_the_async_engine(tiny_chat_engine):
    """xgrammar, all 40 in flight together on the shared server engine."""
    async def one(i: int, params: SamplingParams) -> SimpleNamespace:
        text, finish = "", None
        async for out in tiny_chat_engine.generate(f"item {i}:", params, f"schema-{i}"):  # deltas
            text += out.outputs[0].text
            finish = out.outputs[0].finish_reason
        return SimpleNamespace(text=text, finish_reason=finish)

    async def run_all():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(_bounded_params())))

    _assert_valid(BOUNDED_SCHEMAS, asyncio.run(run_all()))


def _check_reasoning_gate(llm, prompt: str) -> None:
    """The free run's second token stands in for `</think>`: up to it the constrained run is the
    free one, token for token (those rows unconstrained); after it, the choice grammar holds."""
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0].outputs[0]
    assert free.token_ids[0] != free.token_ids[1]
    out = llm.generate([prompt], _params(max_tokens=20, choice=["yes", "no"], reasoning_end_ids=free.token_ids[1:]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:2] == free.token_ids and out.text.startswith(free.text), out.text
    assert out.text[len(free.text):] in ("yes", "no") and out.finish_reason == "stop", out.text


def test_constraints_apply_after_the_reasoning_end(smollm_llm):
    _check_reasoning_gate(smollm_llm, "The capital of France is")


def test_constraints_with_max_tokens_stop_strings_logprobs_and_the_prefix_cache(smollm_llm):
    prompt = "Colors are everywhere: in the sky, in the sea, in the grass and in the flowers. " * 2 + \
        "Which color is the sky? Answer:"  # over one 16-token block, so the prefix cache keeps some of it
    colors = ["red", "green", "blue"]
    cut = smollm_llm.generate([prompt], _params(max_tokens=3, json=SCHEMAS[0], disable_any_whitespace=True),
                              use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    first, again = (smollm_llm.generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=10, logprobs=2, structured_outputs=StructuredOutputsParams(choice=colors)),
        use_tqdm=False)[0] for _ in range(2))
    assert first.outputs[0].text in colors and again.outputs[0].text == first.outputs[0].text
    assert again.num_cached_tokens > 0  # the prompt came from the prefix cache; the grammar is the same
    # Logprobs are of the constrained distribution: what the grammar forbids has none to give.
    assert all(len(p) >= 2 for p in first.outputs[0].logprobs)
    assert all(sum(math.exp(e.logprob) for e in p.values()) < 1 + 1e-4 for p in first.outputs[0].logprobs)
    assert any(abs(p[t].logprob) < 1e-4 for t, p in zip(first.outputs[0].token_ids, first.outputs[0].logprobs))
    word = first.outputs[0].text
    stopped = smollm_llm.generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=10, stop=[word[1:3]], structured_outputs=StructuredOutputsParams(choice=colors)),
        use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == word[:1] and stopped.stop_reason == word[1:3]
    assert not smollm_llm.llm_engine.has_unfinished_requests()


def test_a_bad_constraint_is_refused_before_anything_is_queued(smollm_llm):
    with pytest.raises(ValueError, match="regex constraint does not compile"):
        smollm_llm.generate(["a", "b"], [SamplingParams(max_tokens=2), _params(regex="[unclosed")], use_tqdm=False)
    assert not smollm_llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
