"""Gemma 3 text models (`Gemma3ForCausalLM`, and the language model of `Gemma3ForConditionalGeneration`).

Differences from Llama that matter for exact parity with transformers:
- embeddings are multiplied by sqrt(hidden_size), rounded to the weight dtype first;
- every RMSNorm scales by (1 + weight), computed in float32 before casting back;
- q and k get a per-head RMSNorm before rotary embedding;
- attention and MLP each sit between a pre-norm and a post-norm (four norms per layer);
- attention scale is query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- layers alternate: `sliding_attention` layers see the last `sliding_window` tokens (the query's
  own included) and use the local rope base; `full_attention` layers see everything and use the
  global rope settings (which may carry linear scaling on larger models);
- the MLP uses GELU with the tanh approximation; the LM head is tied to the embedding.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pagellm.attention.layer import Attention
from pagellm.distributed.pipeline import MissingLayer, model_stage
from pagellm.layers.activation import GeluTanhAndMul
from pagellm.layers.embedding import VocabEmbedding
from pagellm.layers.norm import GemmaRMSNorm
from pagellm.layers.rotary import RotaryEmbedding
from pagellm.models.llama import gate_up_and_down_proj, load_merged_weights, qkv_and_o_proj, stage_lm_head
from pagellm.utils import head_dim as config_head_dim

_SLIDING, _FULL = "sliding_attention", "full_attention"
_DEFAULT_LOCAL_ROPE_BASE = 10000.0  # Gemma 3's local base; GGUF files do not store it
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def layer_types(config) -> list[str]:
    """Per-layer attention kind; older configs give only the period of global layers."""
    types = getattr(config, "layer_types", None)
    if types:
        if len(types) != config.num_hidden_layers:
            raise ValueError(f"Gemma 3 config.layer_types has {len(types)} entries for "
                             f"{config.num_hidden_layers} layers")
        unknown = set(types) - {_SLIDING, _FULL}
        if unknown:
            raise ValueError(f"Gemma 3 config.layer_types has unsupported entries {sorted(unknown)}")
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
    return [_FULL if (i + 1) % pattern == 0 else _SLIDING for i in range(config.num_hidden_layers)]


def _rope_params(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        return dict(params[layer_type])
    # Configs from before per-layer-type rope parameters.
    if layer_type == _SLIDING:
        return {"rope_type": "default",
                "rope_theta": getattr(config, "rope_local_base_freq", None) or _DEFAULT_LOCAL_ROPE_BASE}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    return {"rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": getattr(config, "rope_theta", 1_000_000.0), **scaling}


def layer_rope(config, layer_type: str, head_dim: int, max_position: int) -> RotaryEmbedding:
    params = _rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return RotaryEmbedding(inv_freq, max_position)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"Gemma 3 rope type {rope_type!r} ({layer_type}) is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", layer_type=layer_type)
    return RotaryEmbedding(inv_freq, max_position, scaling)


class Gemma3Attention(nn.Module):
    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        self.head_dim = config_head_dim(config)
        bias = bool(getattr(config, "attention_bias", False))
        heads, self.qkv_proj, self.o_proj = qkv_and_o_proj(config, self.head_dim, bias, bias)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads  # this rank's
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        window = config.sliding_window if layer_type == _SLIDING else None
        # Gemma 3 configs carry attn_logit_softcapping (a Gemma 2 leftover) but transformers never
        # applies it to Gemma 3, so neither do we.
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads,
                              scale=config.query_pre_attn_scalar ** -0.5, sliding_window=window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        t = hidden.shape[0]
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
        q, k = rope(positions, q, k)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v))


class Gemma3MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in _GELU_TANH:
            raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        self.gate_up_proj, self.down_proj = gate_up_and_down_proj(config)
        self.act = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Gemma3Attention(config, layer_type)
        self.mlp = Gemma3MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        # The post-norms sit before the residual add, so the fused add+norm of Llama does not apply.
        attn = self.self_attn(positions, self.input_layernorm(hidden), rope)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    """Under pipeline parallelism only this stage's part (see LlamaModel); stages pass the hidden
    states only, since a Gemma 3 layer adds its residual itself."""

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.stage = model_stage(config.num_hidden_layers)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if self.stage.is_first \
            else MissingLayer()
        self.embed_scale = math.sqrt(config.hidden_size)
        types = layer_types(config)
        head_dim = config_head_dim(config)
        # One cos/sin table per layer kind, shared by the layers of that kind.
        self.rotary = nn.ModuleDict({t: layer_rope(config, t, head_dim, max_position) for t in sorted(set(types))})
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, t) if self.stage.owns(i) else MissingLayer()
                                    for i, t in enumerate(types))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else MissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: dict[str, torch.Tensor] | None = None):
        if self.stage.is_first:
            embedding = self.embed_tokens
            # transformers rounds the scale to the weight dtype before multiplying (55.4256 -> 55.5 in bf16).
            scale = torch.tensor(self.embed_scale, dtype=embedding.dtype, device=input_ids.device)
            hidden = embedding(input_ids) * scale
        else:
            hidden = intermediate["hidden"]
        for layer in self.layers[self.stage.start:self.stage.end]:
            hidden = layer(positions, hidden, self.rotary[layer.layer_type])
        if not self.stage.is_last:
            return {"hidden": hidden}
        return self.norm(hidden)


# checkpoint sub-name -> (our merged module attribute, shard)
_MERGED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}

# Gemma3ForConditionalGeneration checkpoints: where the language model's tensors live
# (transformers >= 4.52 layout first, the older one second), and the towers a text model skips.
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_NON_TEXT_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                      "multi_modal_projector.")


def text_weight_name(name: str) -> str | None:
    """The Gemma3ForCausalLM name of a checkpoint tensor; None for vision-tower/projector tensors."""
    if name.startswith(_NON_TEXT_PREFIXES):
        return None
    for prefix, replacement in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name


class Gemma3ForCausalLM(nn.Module):
    intermediate_names = ("hidden",)  # what one pipeline stage hands the next

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = stage_lm_head(config, self.model.stage, self.model.embed_tokens, self.tie_word_embeddings)
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: dict[str, torch.Tensor] | None = None):
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        renamed = ((new, t) for name, t in weights if (new := text_weight_name(name)) is not None)
        load_merged_weights(self, renamed, _MERGED, skip_tied_lm_head=self.tie_word_embeddings)
