"""Structured outputs through the engine: SmolLM2 (greedy) under JSON schemas, regex, choice and a
grammar always gives output that parses and validates, and ends with "stop"; constrained and
unconstrained requests share batches; n > 1 and preemption keep the constraint; a constraint
with a reasoning end starts after it; a bad constraint is a ValueError before anything is queued;
the guidance backend on a tiny model likewise (with the schemas of forced tool choices)."""

from __future__ import annotations

import json
import re

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


def test_guidance_backend(tiny_chat_model):
    from pagellm import LLM

    llm = LLM(tiny_chat_model, max_model_len=256, kv_cache_memory=8 << 20, structured_outputs_backend="guidance",
              quiet=True)
    params = [_params(max_tokens=100, json=SCHEMAS[1], disable_any_whitespace=True), _params(regex=r"[0-9]{4}"),
              _params(choice=["x", "y"])]
    # Closed objects of bounded values: under llguidance a random model adds keys where additionalProperties
    # is unset and writes endless decimals.
    city = {**SCHEMAS[1], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in (("f", SCHEMAS[4]), ("g", city))]
    required = forced_constraint(tools, None, parallel=False)
    named = forced_constraint(tools, "g", parallel=True)
    params += [_params(max_tokens=100, **required), _params(max_tokens=100, **named)]
    outs = llm.generate(["a", "b", "c", "d", "e"], params, use_tqdm=False)
    jsonschema.validate(json.loads(outs[0].outputs[0].text), SCHEMAS[1])
    assert re.fullmatch(r"[0-9]{4}", outs[1].outputs[0].text) and outs[2].outputs[0].text in ("x", "y")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), [o.outputs[0].text for o in outs]
    [call] = json.loads(outs[3].outputs[0].text)  # tool_choice "required" with parallel_tool_calls=false
    jsonschema.validate(call["parameters"], {"f": SCHEMAS[4], "g": city}[call["name"]])
    jsonschema.validate(json.loads(outs[4].outputs[0].text), city)  # named "g"
    _check_reasoning_gate(llm, "hello")


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


def test_a_bad_constraint_is_refused_before_anything_is_queued(smollm_llm):
    with pytest.raises(ValueError, match="regex constraint does not compile"):
        smollm_llm.generate(["a", "b"], [SamplingParams(max_tokens=2), _params(regex="[unclosed")], use_tqdm=False)
    assert not smollm_llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
