"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama-shaped, with fused checkpoint tensors and LongRoPE.

The checkpoint stores `qkv_proj` and `gate_up_proj` already fused, in the order our merged
layers use, so they load as whole tensors. LongRoPE ("longrope", formerly "su") comes from
`get_rope`, which picks the long factors when `max_model_len` exceeds the original context.
Every layer uses the config's sliding window, as HF does.
"""

from __future__ import annotations

from pagellm.models.mistral import MistralForCausalLM


class Phi3ForCausalLM(MistralForCausalLM):
    pass
