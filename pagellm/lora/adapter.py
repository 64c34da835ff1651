"""PEFT LoRA adapter directories, read and checked against the base model's config.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors` (a pickled
`adapter_model.bin` only with `allow_bin=True`: unpickling runs code). Tensor names look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Separate q/k/v and gate/up
targets map onto the merged layers' output slices (`qkv_proj` slice "q", ...), so a layer's
adapter is a set of (slice, A, B) pieces. The scale (`lora_alpha / r`, or `lora_alpha / sqrt(r)`
with rsLoRA; per-module `alpha_pattern` / `rank_pattern` honoured) is folded into B once here.

Shapes are checked against what the model config implies (no model is built), so the front end
can refuse a bad adapter with a clear ValueError before anything reaches the engine.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from pagellm.utils import head_dim as config_head_dim

# PEFT target -> (our module under the decoder layer, slice of a merged layer or "" for a whole layer)
LAYER_TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", ""),
    "gate_proj": ("mlp.gate_up_proj", "gate"), "up_proj": ("mlp.gate_up_proj", "up"),
    "down_proj": ("mlp.down_proj", ""),
}
EMBEDDING_MODULE = "model.embed_tokens"
LM_HEAD_MODULE = "lm_head"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?(\.weight)?$")


@dataclass
class LoRAPiece:
    """One target of one adapter: `lora_a` [r, in], `lora_b` [out, r] with the scale folded in.
    For the embedding, `lora_a` is [r, vocab] (looked up by token id) and `lora_b` [hidden, r]."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    int_id: int
    rank: int  # the largest rank of its pieces
    # our module path (e.g. "model.layers.0.self_attn.qkv_proj") -> slice ("q", or "" for a whole layer) -> piece
    modules: dict[str, dict[str, LoRAPiece]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.lora_a.nbytes + p.lora_b.nbytes for m in self.modules.values() for p in m.values())


def expected_shapes(model_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every PEFT target of a Llama-like model's layers, by PEFT name;
    the embedding as (vocab, hidden) and the LM head as (hidden, vocab)."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    hd = config_head_dim(model_config)
    inter = model_config.intermediate_size
    return {
        "q_proj": (hidden, heads * hd), "k_proj": (hidden, kv_heads * hd), "v_proj": (hidden, kv_heads * hd),
        "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden), "embed_tokens": (model_config.vocab_size, hidden),
        "lm_head": (hidden, model_config.vocab_size),
    }


def read_adapter_config(path: str) -> dict:
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter path {path!r} is not a directory")
    if not os.path.isfile(config_file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {path!r}: adapter_config.json must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"LoRA adapter {path!r}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {path!r}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise ValueError(f"LoRA adapter {path!r}: modules_to_save {config['modules_to_save']!r} (fully trained "
                         "copies of base modules) is not supported")
    return config


def read_adapter_tensors(path: str, allow_bin: bool = False) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    bin_file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_file)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is the caller's bad input
            raise ValueError(f"LoRA adapter {path!r}: cannot read adapter_model.safetensors ({exc})") from exc
    if os.path.isfile(bin_file):
        if not allow_bin:
            raise ValueError(f"LoRA adapter {path!r} has only adapter_model.bin (a pickle, which can run code); "
                             "convert it to safetensors or allow .bin adapters explicitly (lora_allow_bin=True)")
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's alpha_pattern / rank_pattern: a key matches a module name by its suffix (or as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_adapter(path: str, name: str, int_id: int, model_config, max_rank: int, allow_bin: bool = False,
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Reads and validates a PEFT adapter; ValueError naming the adapter and the bad key or shape."""
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path, allow_bin)
    shapes = expected_shapes(model_config)
    num_layers = model_config.num_hidden_layers
    alpha = config.get("lora_alpha", config.get("r", 8))
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if ".base_layer." in key:
            continue  # PEFT saves the base embedding / head next to their adapters; the base model has them
        match = _KEY.match(key[len(_PREFIX):] if key.startswith(_PREFIX) else key)
        if match is None:
            raise ValueError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
        pairs.setdefault(match["module"], {})[match["leaf"].replace("embedding_", "")] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r} at {path!r} has no LoRA tensors")
    adapter = LoRAAdapter(name, int_id, 0)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {name!r}: module {module!r} has {sorted(ab)}, needs lora_A and lora_B")
        target = module.rsplit(".", 1)[-1]
        if target not in shapes:
            raise ValueError(f"LoRA adapter {name!r}: target module {module!r} is not supported "
                             f"(supported: {sorted(shapes)})")
        a, b = ab["lora_A"].to(torch.float32), ab["lora_B"].to(torch.float32)
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"LoRA adapter {name!r}: {module} lora_A/lora_B must be matrices")
        rank = a.shape[0]
        embedding = target == "embed_tokens"
        if rank > max_rank:
            raise ValueError(f"LoRA adapter {name!r}: {module} has rank {rank}, more than max_lora_rank ({max_rank})")
        in_f, out_f = shapes[target]
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise ValueError(f"LoRA adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}; the base model needs ({rank}, {in_f}) and ({out_f}, {rank})")
        module_rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scale = module_alpha / (math.sqrt(module_rank) if rslora else module_rank)
        piece = LoRAPiece(a.to(dtype).contiguous(), (b * scale).to(dtype).contiguous())
        if embedding or target == "lm_head":
            ours, part = (EMBEDDING_MODULE if embedding else LM_HEAD_MODULE), ""
            if module not in ("model.embed_tokens", "lm_head"):
                raise ValueError(f"LoRA adapter {name!r}: unexpected module path {module!r}")
        else:
            layer = re.match(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.\w+$", module)
            if layer is None or int(layer[1]) >= num_layers:
                raise ValueError(f"LoRA adapter {name!r}: module {module!r} is not a layer of the base model "
                                 f"({num_layers} layers)")
            suffix, part = LAYER_TARGETS[target]
            ours = f"model.layers.{layer[1]}.{suffix}"
        adapter.modules.setdefault(ours, {})[part] = piece
        adapter.rank = max(adapter.rank, rank)
    return adapter


def check_adapter(path: str, name: str, model_config, max_rank: int, allow_bin: bool = False) -> int:
    """Validates an adapter as `load_adapter` would (the front end's check); returns its rank."""
    return load_adapter(path, name, 1, model_config, max_rank, allow_bin).rank


def describe(adapter: Optional[LoRAAdapter]) -> str:
    if adapter is None:
        return "none"
    return f"{adapter.name} (id {adapter.int_id}, rank {adapter.rank}, {len(adapter.modules)} layers)"
