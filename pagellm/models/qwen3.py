"""Qwen3 (dense): Llama with an RMSNorm over each head's q and k before rope, and optional sliding-window layers."""

from __future__ import annotations

from pagellm.models.llama import AttentionOptions, LlamaForCausalLM, layer_types_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def attention_options(cls, config, layer_idx: int) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True,
                                sliding_window=layer_types_window(config, layer_idx))
