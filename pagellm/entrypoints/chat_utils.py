"""Chat-template rendering shared by `LLM.chat`, the OpenAI server and `pagellm chat`.

transformers renders templates in jinja2's immutable sandbox, so a template cannot reach
Python internals; we only pick which template and check the messages' shape.
"""

from __future__ import annotations

from typing import Any, Optional

_ROLES = ("system", "user", "assistant", "tool", "developer")


def resolve_chat_template(tokenizer, chat_template: Optional[str]) -> str:
    """The template to use: the one given, else the tokenizer's (from tokenizer_config / GGUF metadata)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model has no chat template; pass one (chat_template=... / --chat-template FILE)")
    return template


def validate_messages(conversation: Any) -> list[dict]:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        if message["role"] not in _ROLES:
            raise ValueError(f"messages[{i}].role {message['role']!r} is not one of {_ROLES}")
    return conversation


def render_chat(tokenizer, conversation: list[dict], chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False, **template_kwargs) -> str:
    template = resolve_chat_template(tokenizer, chat_template)
    validate_messages(conversation)
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False  # continuing the last message means no new turn header
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **template_kwargs)
    except ValueError:
        raise
    except Exception as e:  # template errors (jinja2 TemplateError, sandbox violations) are the user's input
        raise ValueError(f"the chat template failed to render: {e}") from e
