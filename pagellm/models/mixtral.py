"""Mixtral: Mistral attention (sliding window when the config sets one) with a top-k sparse MoE
in place of the MLP. Checkpoints name the MoE `block_sparse_moe`, with per-expert w1/w2/w3."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from pagellm.layers.moe import SparseMoE
from pagellm.models.llama import load_merged_weights, require_silu
from pagellm.models.mistral import MistralForCausalLM

_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(w[123])\.weight")


class MixtralForCausalLM(MistralForCausalLM):
    @classmethod
    def make_mlp(cls, config, layer_idx: int) -> nn.Module:
        require_silu(config)
        return SparseMoE(config.hidden_size, config.intermediate_size, config.num_local_experts,
                         config.num_experts_per_tok)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        modules = dict(self.named_modules())

        def load_expert(name: str, tensor: torch.Tensor) -> bool:
            match = _EXPERT.fullmatch(name)
            if match is None:
                return False
            moe, expert, proj = match.groups()
            if moe not in modules:
                raise ValueError(f"checkpoint tensor {name} has no matching layer")
            modules[moe].load_expert(int(expert), proj, tensor)
            return True

        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in weights)
        load_merged_weights(self, renamed, self.merged_weights, skip_tied_lm_head=self.tie_word_embeddings,
                            handled=load_expert)
