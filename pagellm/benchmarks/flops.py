"""Model FLOPs of a benchmark's work, and the machine's dense fp32 matmul FLOP/s to set them against.

Counted work per request of P prompt and O output tokens: the P + O - 1 positions that go
through the model (the last sampled token is never fed back), each costing 2 FLOPs per weight
of the decoder layers plus attention's QK^T and PV over its context, and the LM head at the O
positions that are sampled. Padding, recomputation after preemption and anything else an
engine does beyond that is not useful work and is not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from pagellm.utils import head_dim as config_head_dim


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=config_head_dim(config),
                   vocab=config.vocab_size)

    @property
    def layer_weights(self) -> int:
        """Weights of the matmuls of one decoder layer (q, k, v, o, gate, up, down)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp

    def request_flops(self, prompt_len: int, output_len: int) -> int:
        fed = prompt_len + output_len - 1
        linear = 2 * self.layers * self.layer_weights * fed
        # Position p attends to p + 1 keys: QK^T and PV are 2 * heads * head_dim FLOPs per key each.
        attention = 4 * self.layers * self.heads * self.head_dim * fed * (fed + 1) // 2
        lm_head = 2 * self.hidden * self.vocab * output_len
        return linear + attention + lm_head

    def total_flops(self, lengths: Iterable[tuple[int, int]]) -> int:
        return sum(self.request_flops(p, o) for p, o in lengths)


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32,
                       device: Optional[str] = None) -> float:
    """Best of `repeats` timings of an n x n by n x n matmul (2 n^3 FLOPs), on torch's current threads."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best
