"""Mistral: Llama with sliding-window attention on every layer (when the config sets a window)."""

from __future__ import annotations

from pagellm.models.llama import AttentionOptions, LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(sliding_window=getattr(config, "sliding_window", None))
