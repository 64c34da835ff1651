"""What a request may constrain its output to, with vLLM's field names.

Exactly one of: `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object),
`regex`, `choice` (one of the strings), `grammar` (EBNF in the backend's dialect: GBNF for
xgrammar, Lark or GBNF for llguidance), `structural_tag` (a structural-tag JSON: xgrammar's
`{"type": "structural_tag", "format": ...}`, or the `{"structures": [...], "triggers": [...]}`
form both backends take).

`reasoning_end_ids`: the constraint applies only after the output contains this token sequence
(a reasoning model's `</think>`); until then the output is free. Not part of the constraint's
identity (compile cache key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
MAX_CONSTRAINT_CHARS = 1 << 20  # a schema or grammar larger than this is refused before compiling


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict[str, Any]]] = None
    json_object: Optional[bool] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    structural_tag: Optional[Union[str, dict[str, Any]]] = None
    # JSON without free whitespace between tokens (fewer tokens, no runaway "\n\n\n...").
    disable_any_whitespace: bool = False
    reasoning_end_ids: Optional[list[int]] = None

    def __post_init__(self) -> None:
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams: give exactly one of {CONSTRAINT_KINDS}, got "
                             f"{given or 'none'}")
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)  # key order kept: properties are generated in schema order
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("StructuredOutputsParams.choice: a non-empty list of non-empty strings")
        for kind in ("json", "regex", "grammar", "structural_tag"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{kind}: must be a non-empty string")
            if value is not None and len(value) > MAX_CONSTRAINT_CHARS:
                raise ValueError(f"StructuredOutputsParams.{kind}: longer than {MAX_CONSTRAINT_CHARS} characters")
        if self.reasoning_end_ids is not None:
            ids = self.reasoning_end_ids
            if not isinstance(ids, (list, tuple)) or not ids or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError("StructuredOutputsParams.reasoning_end_ids: a non-empty list of token ids")
            self.reasoning_end_ids = list(ids)
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"StructuredOutputsParams.json: not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("StructuredOutputsParams.json: a JSON schema is an object")

    @property
    def kind(self) -> str:
        return next(k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (choices as a JSON list)."""
        if self.kind == "json_object":
            return '{"type": "object"}'
        if self.kind == "choice":
            return json.dumps(self.choice)
        return getattr(self, self.kind)

    def cache_key(self) -> tuple[str, str, bool]:
        return self.kind, self.spec, self.disable_any_whitespace
