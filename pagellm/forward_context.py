"""The one piece of ambient state: what the current forward pass needs but the model's
signature (`forward(input_ids, positions)`) does not carry — attention metadata, and which LoRA
adapter slot each token uses."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

_CURRENT: contextvars.ContextVar["ForwardContext | None"] = contextvars.ContextVar("pagellm_forward_context", default=None)


@dataclass
class ForwardContext:
    attn_metadata: Any  # the backend's metadata object for this step
    # Values every layer would otherwise recompute identically in this step (e.g. the rotary
    # cos/sin rows of the step's positions), keyed by their owner; gone with the step.
    step_cache: dict = field(default_factory=dict)
    # The step's `pagellm.lora.ops.LoRAMapping` (None: no token uses an adapter, LoRA layers add nothing).
    lora: Any = None


@contextlib.contextmanager
def set_forward_context(attn_metadata: Any, lora: Any = None) -> Iterator[ForwardContext]:
    token = _CURRENT.set(ForwardContext(attn_metadata, lora=lora))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("attention was called outside set_forward_context(); run the model through the ModelRunner")
    return ctx


def current_forward_context() -> Optional[ForwardContext]:
    """The step's context, or None outside a model run (a layer called on its own)."""
    return _CURRENT.get()
