"""Llama family (Llama 2/3/3.1/3.2, SmolLM2) and the decoder pieces the Llama-like families share.

Works on a flat token batch: `forward(input_ids [T], positions [T]) -> hidden [T, H]`;
which token belongs to which request is the attention backend's business.

Qwen2, Qwen3, Mistral, Phi-3 and Mixtral differ from Llama only in a few switches (biases,
per-head q/k norm, a per-layer sliding window, the MLP), so their model classes subclass
`LlamaForCausalLM` and override `attention_options` / `make_mlp` / `load_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pagellm.attention.kv_quant import load_kv_scale
from pagellm.attention.layer import Attention
from pagellm.distributed.layout import HeadLayout, attention_head_layout
from pagellm.distributed.parallel_state import get_parallel_context
from pagellm.distributed.pipeline import MissingLayer, Stage, missing_prefixes, model_stage
from pagellm.layers.activation import SiluAndMul
from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import Linear, MergedLinear, ParallelStyle
from pagellm.layers.utils import materialize
from pagellm.layers.norm import RMSNorm
from pagellm.layers.rotary import RotaryEmbedding, get_rope
from pagellm.utils import head_dim as config_head_dim


@dataclass(frozen=True)
class AttentionOptions:
    """What differs between the attention blocks of the Llama-like families, per layer."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k, before rope
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only


def qkv_and_o_proj(config, head_dim: int, qkv_bias: bool, o_bias: bool) -> tuple[HeadLayout, MergedLinear, Linear]:
    """This rank's head counts and the attention projections: qkv column-parallel (q split by
    heads, k/v by KV heads, replicated when there are fewer than ranks), o row-parallel."""
    tp_size = get_parallel_context().tp_size
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    heads = attention_head_layout(num_heads, num_kv_heads, tp_size)
    qkv = MergedLinear(config.hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                            "v": num_kv_heads * head_dim},
                       bias=qkv_bias, parallel_style=ParallelStyle.COLUMN,
                       shard_replicas={"k": heads.kv_replicas, "v": heads.kv_replicas})
    o = Linear(num_heads * head_dim, config.hidden_size, bias=o_bias, parallel_style=ParallelStyle.ROW)
    return heads, qkv, o


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary_emb: RotaryEmbedding, options: AttentionOptions = AttentionOptions()) -> None:
        super().__init__()
        self.head_dim = config_head_dim(config)
        heads, self.qkv_proj, self.o_proj = qkv_and_o_proj(config, self.head_dim, options.qkv_bias, options.o_bias)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads  # this rank's
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if options.qk_norm else None
        self.rotary_emb = rotary_emb  # one table shared by every layer
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, scale=self.head_dim ** -0.5,
                              sliding_window=options.sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        t = hidden.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # [T, H, D] views: Attention takes them as they are
        return self.o_proj(out)


def require_silu(config) -> None:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")


def gate_up_and_down_proj(config, bias: bool = False) -> tuple[MergedLinear, Linear]:
    """gate/up column-parallel (each split on its own, so the activation pairs them up on every
    rank), down row-parallel."""
    inter = config.intermediate_size
    tp_size = get_parallel_context().tp_size
    if inter % tp_size:
        raise ValueError(f"intermediate_size ({inter}) is not divisible by tensor_parallel_size ({tp_size})")
    gate_up = MergedLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias,
                           parallel_style=ParallelStyle.COLUMN)
    return gate_up, Linear(inter, config.hidden_size, bias=bias, parallel_style=ParallelStyle.ROW)


class LlamaMLP(nn.Module):
    def __init__(self, config, bias: bool = False) -> None:
        super().__init__()
        require_silu(config)
        self.gate_up_proj, self.down_proj = gate_up_and_down_proj(config, bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); the residual add is fused into the norms."""

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
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


# What one pipeline stage hands the next (each [num_tokens, hidden_size]).
INTERMEDIATE_HIDDEN_AND_RESIDUAL = ("hidden", "residual")


class LlamaModel(nn.Module):
    """Under pipeline parallelism only this stage's part: its decoder layers, the embedding on
    the first stage, the final norm on the last (`MissingLayer` in the other places)."""

    def __init__(self, config, max_position: int,
                 attention_options: Callable[[object, int], AttentionOptions],
                 make_mlp: Callable[[object, int], nn.Module]) -> None:
        super().__init__()
        self.stage: Stage = model_stage(config.num_hidden_layers)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if self.stage.is_first \
            else MissingLayer()
        rope = get_rope(config, config_head_dim(config), max_position)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, LlamaAttention(config, rope, attention_options(config, i)), make_mlp(config, i))
            if self.stage.owns(i) else MissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else MissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: dict[str, torch.Tensor] | None = None):
        """The final hidden states on the last stage; the next stage's inputs (`intermediate`) elsewhere."""
        if self.stage.is_first:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate["hidden"], intermediate["residual"]
        for layer in self.layers[self.stage.start:self.stage.end]:
            hidden, residual = layer(positions, hidden, residual)
        if not self.stage.is_last:
            return {"hidden": hidden, "residual": residual}
        hidden, _ = self.norm(hidden, residual)
        return hidden


# checkpoint sub-name -> (our merged module attribute, shard)
LLAMA_MERGED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(nn.Module):
    """Llama; subclasses change the per-layer attention options, the MLP and the weight names."""

    merged_weights: dict[str, tuple[str, str]] = LLAMA_MERGED
    intermediate_names = INTERMEDIATE_HIDDEN_AND_RESIDUAL

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, self.attention_options, self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = stage_lm_head(config, self.model.stage, self.model.embed_tokens, self.tie_word_embeddings)

    @classmethod
    def attention_options(cls, config, layer_idx: int) -> AttentionOptions:
        # Llama has no sliding window (HF's Llama ignores one in the config too).
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        return LlamaMLP(config, bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: dict[str, torch.Tensor] | None = None):
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_merged_weights(self, weights, self.merged_weights, skip_tied_lm_head=self.tie_word_embeddings)


def stage_lm_head(config, stage: Stage, embedding: nn.Module, tied: bool) -> nn.Module:
    """The LM head on the last stage (a MissingLayer elsewhere). A tied head shares the embedding's
    weight when the embedding is on the same stage; otherwise it holds its own copy, loaded from
    the embedding's checkpoint tensor (`loads_tied_embedding`)."""
    if not stage.is_last:
        return MissingLayer()
    shares = tied and stage.is_first
    head = LMHead(config.vocab_size, config.hidden_size, embedding if shares else None)
    head.loads_tied_embedding = tied and not shares
    return head


def layer_types_window(config, layer_idx: int) -> int | None:
    """The window of a layer in configs with `layer_types` (Qwen2/3): only "sliding_attention" layers slide."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return getattr(config, "sliding_window", None)
    return getattr(config, "sliding_window", None) if layer_types[layer_idx] == "sliding_attention" else None


def load_merged_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        merged: dict[str, tuple[str, str]], skip_tied_lm_head: bool,
                        handled: Callable[[str, torch.Tensor], bool] | None = None,
                        embedding_name: str = "model.embed_tokens.weight") -> None:
    """Loads HF-named tensors, routing separate q/k/v and gate/up tensors into merged layers.

    A merged layer may also be filled whole (Phi-3 stores qkv_proj / gate_up_proj fused).
    `handled(name, tensor)` may take tensors first (returns True when it loaded one); modules
    it fills report their own gaps through a `missing_weights()` method.
    Under pipeline parallelism tensors of modules on other stages are skipped, and a tied LM head
    on a stage without the embedding is filled from `embedding_name`.
    Fails loudly on unknown names and on parameters the checkpoint never filled.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    other_stages = missing_prefixes(model)
    head = modules.get("lm_head")
    head_from_embedding = getattr(head, "loads_tied_embedding", False)
    filled: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue  # some checkpoints store rope buffers; we compute our own
        if name == "lm_head.weight" and skip_tied_lm_head:
            continue
        if name == embedding_name and head_from_embedding:
            head.load("weight", tensor)
            filled.add("lm_head.weight")
        if other_stages and name.startswith(other_stages):
            continue
        if handled is not None and handled(name, tensor):
            continue
        if load_kv_scale(modules, name, tensor):
            continue  # an fp8 checkpoint's KV cache scales (used by kv_cache_dtype=fp8)
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
        module = modules.get(module_path)
        if callable(getattr(module, "load", None)):
            # Linears, the embedding and the LM head cut their tensor-parallel part and check shapes.
            try:
                module.load(leaf, tensor)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name}: {exc}") from exc
        else:
            param = params[name]
            tensor = materialize(tensor)  # norms and other whole parameters
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(tensor)
        filled.add(name)
    missing: list[str] = []
    self_checked: set[str] = set()  # parameters whose modules check themselves
    for name, module in modules.items():
        if hasattr(module, "missing_weights"):
            missing += [f"{name}.{m}" for m in module.missing_weights()]
            self_checked |= {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
        if isinstance(module, MergedLinear):
            for leaf in ("weight", "bias"):
                if getattr(module, leaf) is None or f"{name}.{leaf}" in filled:
                    continue
                missing += [f"{name}.{leaf}:{s}" for s in module.shard_offsets if f"{name}.{leaf}:{s}" not in filled]
    merged_params = {f"{n}.{leaf}" for n, m in modules.items() if isinstance(m, MergedLinear) for leaf in ("weight", "bias")}
    missing += [n for n in params if n not in filled and n not in merged_params and n not in self_checked
                and not (skip_tied_lm_head and n == "lm_head.weight" and not head_from_embedding)]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
