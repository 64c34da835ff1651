"""The chat endpoint's tool-calling policy: which requests may use tools, and how.

    tools + tool_choice "auto" (the default with tools)  -> the model may call tools; its text is
                                                             parsed with --tool-call-parser
    tool_choice "none"                                    -> tools are shown to the template, nothing is parsed
    tool_choice "required" / a named function             -> forced with a grammar built from the tools' JSON
                                                             schemas (forced_tool_calls.py), parsed by its own
                                                             parser; needs neither flag

Tools are handed to the chat template (`tools=`), as transformers' templates expect them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from pagellm.entrypoints.openai.errors import OpenAIError
from pagellm.entrypoints.openai.forced_tool_calls import ForcedToolParser, forced_constraint
from pagellm.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessageIn
from pagellm.entrypoints.openai.tool_parsers import ToolParser


@dataclass
class ToolSetup:
    template_tools: Optional[list[dict[str, Any]]]  # what the template gets as `tools`
    parser: Optional[ToolParser]  # set when the output is to be parsed for tool calls
    parallel: bool = True  # False: at most one call per choice (parallel_tool_calls=false)
    constraint: Optional[dict[str, Any]] = None  # structured-outputs fields forcing the call ("required", named)
    named: Optional[str] = None  # the function of a named tool_choice

    @property
    def finish_reason_on_call(self) -> str:
        """What a choice that stopped after calling tools reports: OpenAI says "stop" for a named
        function, "tool_calls" otherwise."""
        return "stop" if self.named is not None else "tool_calls"


def tool_setup(request: ChatCompletionRequest, parser_cls: Optional[type[ToolParser]], auto_enabled: bool,
               tokenizer: Any) -> ToolSetup:
    """Checks tools / tool_choice / parallel_tool_calls; OpenAIError (400) on a bad or unservable combination."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice needs tools; send the functions the model may call in `tools`", 400,
                              param="tool_choice", code="invalid_value")
        return ToolSetup(None, None)
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise OpenAIError("tools have duplicate function names", 400, param="tools", code="invalid_value")
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(named, str):
            raise OpenAIError('a named tool_choice is {"type": "function", "function": {"name": ...}}', 400,
                              param="tool_choice", code="invalid_value")
        if named not in names:
            raise OpenAIError(f"tool_choice names the function {named!r}, which is not in tools ({names})", 400,
                              param="tool_choice", code="invalid_value")
    if choice == "none":
        return ToolSetup(tools, None)
    parallel = request.parallel_tool_calls is not False
    if choice == "required" or isinstance(choice, dict):
        named = choice["function"]["name"] if isinstance(choice, dict) else None
        if (request.response_format or {}).get("type", "text") != "text" or request.structured_outputs is not None:
            raise OpenAIError(f"tool_choice {'named' if named else 'required'} constrains the output itself; it "
                              "cannot be combined with response_format or structured_outputs", 400,
                              param="tool_choice", code="invalid_value")
        return ToolSetup(tools, ForcedToolParser(tokenizer, tools, named), parallel=parallel,
                         constraint=forced_constraint(tools, named, parallel), named=named)
    if not auto_enabled or parser_cls is None:
        # Without a tool_choice, auto is implied by sending tools: name the field the client sent.
        raise OpenAIError('tools with "auto" tool choice need the server started with --enable-auto-tool-choice '
                          "and --tool-call-parser", 400, param="tool_choice" if choice else "tools",
                          code="unsupported_parameter")
    return ToolSetup(tools, parser_cls(tokenizer, tools), parallel=parallel)


def tool_message_fields(message: ChatMessageIn) -> dict[str, Any]:
    """A message's tool fields as templates read them: arguments as an object when they are JSON."""
    out: dict[str, Any] = {}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type,
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _arguments(text: str) -> Any:
    # Templates (Hermes, Llama 3, Qwen) iterate or `tojson` the arguments; OpenAI sends JSON text.
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def response_format_constraint(request: ChatCompletionRequest) -> Optional[dict[str, Any]]:
    """OpenAI's response_format as structured-outputs fields (None for text); 400 on a bad one."""
    fmt = request.response_format
    if fmt is None or fmt.get("type") == "text":
        return None
    if request.structured_outputs is not None:
        raise OpenAIError("give response_format or structured_outputs, not both", 400, param="response_format",
                          code="invalid_value")
    if fmt.get("type") == "json_object":
        return {"json_object": True}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise OpenAIError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                              400, param="response_format", code="invalid_value")
        return {"json": schema}
    raise OpenAIError(f"response_format type {fmt.get('type')!r} is not one of text, json_object, json_schema", 400,
                      param="response_format", code="invalid_value")
