"""Qwen2 / Qwen2.5: Llama with biases on q/k/v (not on o), and optional sliding-window layers."""

from __future__ import annotations

from pagellm.models.llama import AttentionOptions, LlamaForCausalLM, layer_types_window


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config, layer_idx: int) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, sliding_window=layer_types_window(config, layer_idx))
