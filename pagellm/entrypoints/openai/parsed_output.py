"""What the output parsers (tool calls, reasoning) produce: whole messages and stream deltas.

Plain dataclasses, independent of the HTTP protocol models: `to_dict()` gives the OpenAI JSON
shape (fields that are None left out), which the chat endpoint can validate into its own
response models.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Optional

_ID_ALPHABET = string.ascii_letters + string.digits


def make_tool_call_id(length: int = 24) -> str:
    """`call_` + random alphanumerics, as OpenAI and vLLM name tool calls (unique per call)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object as text, exactly what the client will json.loads


@dataclass
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


@dataclass
class ExtractedToolCalls:
    """A whole message split into tool calls and the text around them (None when there is none)."""
    tools_called: bool
    tool_calls: list[ToolCall]
    content: Optional[str]


@dataclass
class DeltaFunctionCall:
    name: Optional[str] = None
    arguments: Optional[str] = None


@dataclass
class DeltaToolCall:
    """One tool call's fragment. The first fragment of a call carries id, type and name."""
    index: int
    function: DeltaFunctionCall
    id: Optional[str] = None
    type: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out = _without_none({"index": self.index, "id": self.id, "type": self.type})
        out["function"] = _without_none({"name": self.function.name, "arguments": self.function.arguments})
        return out


@dataclass
class DeltaMessage:
    """One streamed step of an assistant message: text, reasoning text and tool-call fragments."""
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.content and not self.reasoning_content and not self.tool_calls

    def to_dict(self) -> dict[str, Any]:
        out = _without_none({"content": self.content or None,
                             "reasoning_content": self.reasoning_content or None})
        if self.tool_calls:
            out["tool_calls"] = [t.to_dict() for t in self.tool_calls]
        return out
