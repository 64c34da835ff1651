"""Sparse mixture of experts (Mixtral style): a softmax top-k router over stacked expert weights.

The expert weights live in two stacked tensors, `w13` [E, 2I, H] (gate | up) and `w2` [E, H, I].
A step's (token, expert) pairs are sorted by expert, so each expert runs one pair of matmuls
over a contiguous slice of the batch: the Python loop is over experts, never over tokens.

Under tensor parallelism every rank holds every expert's slice of the intermediate dim (gate and
up rows, down columns) and the router whole; the partial outputs are summed over the ranks.
With expert parallelism (`ParallelContext.expert_parallel`) a rank instead holds whole experts,
`num_experts // tp_size` consecutive ones, and computes only the (token, expert) pairs routed to
them; the same all-reduce sums each token's contributions from the ranks owning its experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.distributed.communication import tensor_parallel_all_reduce
from pagellm.distributed.layout import ShardRange, expert_range, shard_range
from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context
from pagellm.layers.activation import SiluAndMul
from pagellm.layers.linear import Linear
from pagellm.layers.utils import materialize

# checkpoint expert projection -> (our stacked parameter, row slice: 0 = gate / down, 1 = up)
_EXPERT_PROJS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): softmax over experts (in float32), the top k,
    renormalised to sum to one when asked (Mixtral)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token t; x: [T, H] -> [T, H].

    `w13` / `w2` hold experts first_expert .. first_expert + len(w13) - 1; pairs routed to other
    experts (held by other ranks under expert parallelism) contribute nothing here."""
    num_tokens, top_k = ids.shape
    num_local = w13.shape[0]
    flat_ids = ids.flatten() - first_expert
    local = (flat_ids >= 0) & (flat_ids < num_local)
    pairs = torch.arange(flat_ids.numel(), device=ids.device)[local]
    flat_ids = flat_ids[local]
    order = pairs[flat_ids.argsort(stable=True)]  # this rank's (token, k) pairs grouped by expert
    token_of = order // top_k
    counts = torch.bincount(flat_ids, minlength=num_local).tolist()
    grouped = x[token_of]
    out = torch.empty_like(grouped)
    act = SiluAndMul()
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            out[rows] = F.linear(act(F.linear(grouped[rows], w13[expert])), w2[expert])
            start += n
    # Weight in float32 like the reference, then add each token's k contributions.
    out = (out.float() * weights.flatten()[order].unsqueeze(-1)).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, out)


class SparseMoE(nn.Module):
    """Router (`gate`) + experts; replaces the MLP of a decoder layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool = True, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {top_k}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.parallel = parallel if parallel is not None else get_parallel_context()
        tp_rank, tp_size = self.parallel.tp_rank, self.parallel.tp_size
        if self.parallel.expert_parallel:
            # Whole experts on this rank: every expert's intermediate dim in full.
            self.expert_range = expert_range(num_experts, tp_rank, tp_size)
            self.inter_range = ShardRange(0, intermediate_size)
        else:
            # This rank's slice of every expert's intermediate dim (all of it at tp_size 1).
            self.expert_range = ShardRange(0, num_experts)
            self.inter_range = shard_range(intermediate_size, tp_rank, tp_size, what="intermediate_size")
        self.num_experts = num_experts
        num_local = self.expert_range.size
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = self.inter_range.size
        self.gate = Linear(hidden_size, num_experts, parallel=self.parallel)
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * self.intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, self.intermediate_size), requires_grad=False)
        self._loaded: set[tuple[int, str]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = grouped_expert_mlp(x, self.w13, self.w2, weights, ids, first_expert=self.expert_range.start)
        return tensor_parallel_all_reduce(out, self.parallel)

    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """One expert's checkpoint projection: w1 (gate) / w3 (up) [I, H], w2 (down) [H, I]."""
        if proj not in _EXPERT_PROJS:
            raise ValueError(f"unknown expert projection {proj!r}; expected one of {sorted(_EXPERT_PROJS)}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (the model has {self.num_experts} experts)")
        local = expert - self.expert_range.start
        if not 0 <= local < self.expert_range.size:
            return  # another rank's expert (expert parallelism)
        attr, part = _EXPERT_PROJS[proj]
        tensor = self._checkpoint_shard(expert, proj, tensor)
        target = getattr(self, attr).data[local]
        if attr == "w13":
            target = target.narrow(0, part * self.intermediate_size, self.intermediate_size)
        if target.shape != tensor.shape:
            raise ValueError(f"expert {expert} {proj} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        self._loaded.add((expert, proj))

    def _checkpoint_shard(self, expert: int, proj: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the intermediate dim: rows of w1/w3, columns of w2."""
        if self.inter_range.size == self.full_intermediate_size:
            return materialize(tensor)
        dim = 1 if proj == "w2" else 0
        if tensor.dim() != 2 or tensor.shape[dim] != self.full_intermediate_size:
            raise ValueError(f"expert {expert} {proj} has shape {tuple(tensor.shape)}; expected "
                             f"{self.full_intermediate_size} along dim {dim} before the tensor-parallel split")
        return tensor.narrow(dim, self.inter_range.start, self.inter_range.size)

    def missing_weights(self) -> list[str]:
        """Expert projections the checkpoint never filled (the router is checked like any parameter)."""
        experts = range(self.expert_range.start, self.expert_range.start + self.expert_range.size)
        return [f"experts.{e}.{p}" for e in experts for p in _EXPERT_PROJS if (e, p) not in self._loaded]
