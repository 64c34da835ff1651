"""Llama family (Llama 2/3/3.1/3.2, SmolLM2, Mistral-style without sliding window).

Works on a flat token batch: `forward(input_ids [T], positions [T]) -> hidden [T, H]`;
which token belongs to which request is the attention backend's business.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagellm.attention.layer import Attention
from pagellm.layers.activation import SiluAndMul
from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import Linear, MergedLinear
from pagellm.layers.norm import RMSNorm
from pagellm.layers.rotary import get_rope


class LlamaAttention(nn.Module):
    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = MergedLinear(hidden, {
            "q": self.num_heads * self.head_dim,
            "k": self.num_kv_heads * self.head_dim,
            "v": self.num_kv_heads * self.head_dim,
        }, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.rotary_emb = get_rope(config, self.head_dim, max_position)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, scale=self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        t = hidden.shape[0]
        q, k = self.rotary_emb(positions, q.view(t, self.num_heads, self.head_dim),
                               k.view(t, self.num_kv_heads, self.head_dim))
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = Linear(inter, config.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, max_position)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, max_position) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# checkpoint sub-name -> (our merged module attribute, shard)
_MERGED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.sliding_window < max_position:
            raise ValueError("Mistral-style sliding-window attention is not supported by the Llama model; "
                             f"use max_model_len <= {config.sliding_window}")
        self.config = config
        self.model = LlamaModel(config, max_position)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, self.model.embed_tokens if tied else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_merged_weights(self, weights, _MERGED, skip_tied_lm_head=self.lm_head.tied)


def load_merged_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        merged: dict[str, tuple[str, str]], skip_tied_lm_head: bool) -> None:
    """Loads HF-named tensors, routing separate q/k/v and gate/up tensors into merged layers.

    Fails loudly on unknown names and on parameters the checkpoint never filled.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    filled: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue  # some checkpoints store rope buffers; we compute our own
        if name == "lm_head.weight" and skip_tied_lm_head:
            continue
        module_path, _, leaf = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in merged:
            attr, shard = merged[proj]
            target = f"{parent}.{attr}"
            if target not in modules:
                raise ValueError(f"checkpoint tensor {name} has no matching layer")
            modules[target].load_shard(shard, leaf, tensor)
            filled.add(f"{target}.{leaf}:{shard}")
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {name} does not match any model parameter")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(tensor)
        filled.add(name)
    missing = []
    for name, module in modules.items():
        if isinstance(module, MergedLinear):
            for leaf in ("weight", "bias"):
                if getattr(module, leaf) is None:
                    continue
                missing += [f"{name}.{leaf}:{s}" for s in module.shard_offsets if f"{name}.{leaf}:{s}" not in filled]
    merged_params = {f"{n}.{leaf}" for n, m in modules.items() if isinstance(m, MergedLinear) for leaf in ("weight", "bias")}
    missing += [n for n in params if n not in filled and n not in merged_params
                and not (skip_tied_lm_head and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
