"""The default backend, "auto": xgrammar (fast masks, compiled ahead), and llguidance for the JSON
schemas whose keywords xgrammar would accept but not enforce.

xgrammar (0.2.x) compiles a schema with, say, `uniqueItems` or `not` into a grammar that simply
leaves the keyword out, so the output can break the schema the client asked for. Which keywords:
measured by compiling one schema per keyword and feeding the grammar an instance that breaks only
that keyword (`unenforced_by_xgrammar` lists them). Those schemas go to llguidance, which enforces
the keyword or refuses it with its own message; both refusing is a ValueError naming the keyword.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator, Optional

from pagellm.structured_output.params import StructuredOutputsParams

# Keywords that only annotate: siblings of an allOf that change nothing.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id", "$defs", "definitions"})
_ALWAYS_DROPPED = ("uniqueItems", "contains", "minContains", "maxContains", "dependentRequired",
                   "dependentSchemas", "not", "if", "then", "else")
# String formats xgrammar writes a grammar for; any other it drops (the string is then free).
_XGRAMMAR_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                               "uri-reference", "uuid", "uri-template", "json-pointer", "relative-json-pointer"})


def _walk(schema: Any, path: str = "#") -> Iterator[tuple[str, dict]]:
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _walk(value, f"{path}/{i}")


def unenforced_by_xgrammar(schema: Any) -> list[str]:
    """`path: keyword` for each place xgrammar would silently not enforce."""
    found = []
    for path, node in _walk(schema):
        for key in _ALWAYS_DROPPED:
            if key in node and not (key == "uniqueItems" and node[key] is False):
                found.append(f"{path}: {key}")
        multiple = node.get("multipleOf")
        if multiple is not None and (node.get("type") != "integer" or not float(multiple).is_integer()):
            found.append(f"{path}: multipleOf (of a number)")
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in _XGRAMMAR_FORMATS and node.get("type", "string") == "string":
            found.append(f"{path}: format {fmt!r}")
        shaped = [k for k in ("pattern", "format") if isinstance(node.get(k), str)]
        if shaped and ("minLength" in node or "maxLength" in node):
            found.append(f"{path}: {shaped[0]} with minLength/maxLength")
        all_of = node.get("allOf")
        # One subschema alone (pydantic's way to annotate a $ref) is kept; more, or beside other
        # keywords, xgrammar reduces to one of them.
        if isinstance(all_of, list) and (len(all_of) > 1 or set(node) - _ANNOTATIONS - {"allOf"}):
            found.append(f"{path}: allOf")
    return found


class AutoBackend:
    name = "auto"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        from pagellm.structured_output.xgrammar_backend import XGrammarBackend

        self._args = (tokenizer, vocab_size, stop_token_ids)
        self.xgrammar = XGrammarBackend(tokenizer, vocab_size, stop_token_ids, refuse_unenforced=False)
        self._guidance: Optional[Any] = None
        self._lock = threading.Lock()

    def guidance(self) -> Any:
        with self._lock:  # compiles run on worker threads; build llguidance's tokenizer once
            if self._guidance is None:
                from pagellm.structured_output.guidance_backend import GuidanceBackend

                self._guidance = GuidanceBackend(*self._args)
            return self._guidance

    def compile(self, params: StructuredOutputsParams) -> tuple[Any, Any]:
        """(the backend that compiled it, its compiled constraint)."""
        if params.kind in ("json", "json_object"):
            dropped = unenforced_by_xgrammar(json.loads(params.spec))
            if dropped:
                backend = self.guidance()
                try:
                    return backend, backend.compile(params)
                except ValueError as exc:
                    raise ValueError(f"{exc} (xgrammar would not enforce it either: {'; '.join(dropped)})") from None
        return self.xgrammar, self.xgrammar.compile(params)

    def matcher(self, compiled: tuple[Any, Any]) -> Any:
        backend, grammar = compiled
        return backend.matcher(grammar)
