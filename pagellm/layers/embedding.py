"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.layers.linear_method import CpuPackedLinearMethod, UnquantizedLinearMethod


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """The output projection; like a linear layer it applies its weight through a `LinearMethod`."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.bias = None
        self.method = UnquantizedLinearMethod()
        self.packed: Optional[torch.Tensor] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 whatever the model dtype: sampling and logprobs need the precision."""
        return self.method.apply(self, hidden).float()

    def prepack_for_cpu(self) -> None:
        """The LM head is the largest matmul of a small model, and the slowest through MKL.
        A tied head keeps the embedding's weight (the lookup needs it) next to the packed copy."""
        self.method = CpuPackedLinearMethod(keep_plain=self.tied)
        self.method.process_after_loading(self)
