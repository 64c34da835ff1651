"""Small shared helpers with no dependencies (no torch), so the pure-Python `core/` may use them too."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division for integers (how many blocks of `b` hold `a` items)."""
    return -(-a // b)


def head_dim(config) -> int:
    """Per-head width of a transformers config: `head_dim` when the config sets one (Gemma, Qwen3),
    else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
