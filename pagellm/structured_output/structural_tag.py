"""Structural tags: free text in which tagged segments, once triggered, follow a schema.

Two spellings reach us:
- vLLM's `{"type": "structural_tag", "structures": [{"begin": "<function=f>", "schema": {...},
  "end": "</function>"}, ...], "triggers": ["<function="]}`: each structure's `begin` starts with
  one of the triggers; text is free until a trigger, then the structure's begin, a JSON value of
  its schema and its end follow.
- xgrammar's own `{"type": "structural_tag", "format": {...}}` tree.

xgrammar compiles the second; the first becomes its `triggered_tags` format. llguidance compiles
tags with JSON-schema contents (`StructTag`), so it takes the first form, and a `format` that is
exactly `triggered_tags` of such tags; other trees are xgrammar's alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tag:
    trigger: str
    begin: str
    schema: Any  # a JSON schema (dict or bool)
    end: str


def parse(spec: str) -> dict[str, Any]:
    try:
        tag = json.loads(spec)
    except ValueError as exc:
        raise ValueError(f"the structural_tag constraint is not valid JSON: {exc}") from None
    if not isinstance(tag, dict) or ("structures" not in tag and "format" not in tag):
        raise ValueError('the structural_tag constraint is {"type": "structural_tag", "structures": [...], '
                         '"triggers": [...]} or {"type": "structural_tag", "format": {...}}')
    return tag


def tags_of(tag: dict[str, Any]) -> list[Tag]:
    """The triggered tags of either spelling; ValueError for a `format` tree of another shape."""
    if "structures" in tag:
        structures, triggers = tag.get("structures"), tag.get("triggers")
        contents = [(s.get("begin"), s.get("schema"), s.get("end")) for s in _dicts(structures, "structures")]
    else:
        fmt = tag["format"]
        if not isinstance(fmt, dict) or fmt.get("type") != "triggered_tags":
            raise ValueError("this structural_tag format is not a triggered_tags of JSON-schema tags; the xgrammar "
                             "backend compiles any format")
        triggers = fmt.get("triggers")
        contents = []
        for t in _dicts(fmt.get("tags"), "format.tags"):
            content = t.get("content")
            if not isinstance(content, dict) or content.get("type") != "json_schema":
                raise ValueError("this structural_tag format has a tag whose content is not a json_schema; the "
                                 "xgrammar backend compiles any format")
            contents.append((t.get("begin"), content.get("json_schema"), t.get("end")))
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag: triggers must be a non-empty list of non-empty strings")
    out = []
    for begin, schema, end in contents:
        if not isinstance(begin, str) or not isinstance(end, str) or not isinstance(schema, (dict, bool)):
            raise ValueError("structural_tag: each structure has a string begin and end and a JSON schema")
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(f"structural_tag: begin {begin!r} starts with none of the triggers {triggers}")
        out.append(Tag(trigger, begin, schema, end))
    return out


def xgrammar_format(tag: dict[str, Any]) -> dict[str, Any]:
    """xgrammar's spelling of either form."""
    if "format" in tag:
        return tag
    tags = tags_of(tag)
    return {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": list(tag["triggers"]),
        "tags": [{"begin": t.begin, "content": {"type": "json_schema", "json_schema": t.schema}, "end": t.end}
                 for t in tags]}}


def _dicts(items: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"structural_tag: {what} must be a non-empty list of objects")
    return items
