"""LoRA in the model's layers: a weight-method wrapper around each projection's own method, and
the per-layer stack of adapter slots it reads.

    layer.method = LoRALinearMethod(base_method, LoRASlotWeights(layer, ...))

`apply` runs the base method (plain, oneDNN-packed or quantized: all unchanged) and adds the
batched LoRA term of the step's tokens (`ForwardContext.lora`, a `LoRAMapping`); without a
mapping (no adapter in the step) it is the base method alone. Slot s of a layer holds one
adapter's pieces: `a` [S, n * R, in] stacks its slices' A (zero-padded to max rank R), and each
output slice j of a merged layer has its own `b[j]` [S, R, size_j] (B transposed, scale folded).

Tensor parallelism: a column-parallel layer holds its rows of B (per slice for merged layers),
a row-parallel one its columns of A; the shrunk activations are then partial sums, and since the
expand is linear the layer's existing all-reduce sums the LoRA term with the base output. The
embedding's term is added after its all-reduce, from whole (replicated) weights, and the LM
head's after its all-gather (before any logit soft-cap the model applies next).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pagellm.forward_context import current_forward_context
from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import Linear, MergedLinear, ParallelStyle
from pagellm.layers.linear_method import LinearMethod
from pagellm.lora.adapter import LM_HEAD_MODULE, LoRAPiece
from pagellm.lora.ops import LoRAMapping, add_lora_grouped, embedding_lora

LORA_LAYER_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRASlotWeights:
    """One layer's adapter slots; `has[s]`: slot s has a piece for this layer (else it is skipped)."""

    def __init__(self, layer: Linear, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layer = layer
        if isinstance(layer, MergedLinear):
            self.slices = [(name, off, size) for name, (off, size) in layer.shard_offsets.items()]
        else:
            self.slices = [("", 0, _local(layer, ParallelStyle.COLUMN, layer.out_features))]
        self.rank = max_rank
        in_features = _local(layer, ParallelStyle.ROW, layer.in_features)
        self.a = torch.zeros(max_loras, len(self.slices) * max_rank, in_features, dtype=dtype, device=device)
        self.b = [torch.zeros(max_loras, max_rank, size, dtype=dtype, device=device) for _, _, size in self.slices]
        self.has = [False] * max_loras

    def _shard(self, name: str, piece: LoRAPiece) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a piece: B's rows of a column-parallel layer, A's columns of a row one."""
        a, b = piece.lora_a, piece.lora_b
        layer = self.layer
        if isinstance(layer, MergedLinear):
            if layer.split_shards:
                _, part = layer.shard_parts[name]
                b = b.narrow(0, part.start, part.size)
        elif layer.tp_range is not None and layer.parallel_style is ParallelStyle.COLUMN:
            b = b.narrow(0, layer.tp_range.start, layer.tp_range.size)
        elif layer.tp_range is not None and layer.parallel_style is ParallelStyle.ROW:
            a = a.narrow(1, layer.tp_range.start, layer.tp_range.size)
        return a, b

    def set_slot(self, slot: int, pieces: Optional[dict[str, LoRAPiece]]) -> None:
        self.a[slot].zero_()
        for b in self.b:
            b[slot].zero_()
        self.has[slot] = bool(pieces)
        for j, (name, _, _) in enumerate(self.slices):
            piece = (pieces or {}).get(name)
            if piece is None:
                continue
            a, b = self._shard(name, piece)
            r = a.shape[0]
            self.a[slot, j * self.rank:j * self.rank + r].copy_(a)
            self.b[j][slot, :r].copy_(b.t())

    def add(self, out: torch.Tensor, x: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        if not any(self.has[s] for s in mapping.active):
            return out
        if x.is_cuda:
            from pagellm.ops.triton_lora import add_lora_triton

            return add_lora_triton(out, x, self.a, self.b, self.slices, mapping.token_slots)
        if len(self.slices) == 1:
            return add_lora_grouped(out, x, self.a, self.b[0], mapping)
        # merged layer: shrink once for every slice, then expand slice by slice into its columns
        return add_lora_grouped_slices(out, x, self.a, self.b, self.slices, self.rank, mapping)


def _local(layer: Linear, style: ParallelStyle, full: int) -> int:
    """This rank's size of a dim that `style` splits (the full size when the layer is not split so)."""
    return layer.tp_range.size if layer.tp_range is not None and layer.parallel_style is style else full


def add_lora_grouped_slices(out, x, a, bs, slices, rank, mapping: LoRAMapping) -> torch.Tensor:
    """`add_lora_grouped` for a merged layer: one shrink over all slices, one expand per slice."""
    if mapping.uniform_slot is not None:
        s = mapping.uniform_slot
        shrunk = x @ a[s].t()
        for j, (_, off, size) in enumerate(slices):
            out.narrow(-1, off, size).addmm_(shrunk[:, j * rank:(j + 1) * rank], bs[j][s])
        return out
    groups, length = mapping.slots.shape[0], mapping.group_len
    xg = x.index_select(0, mapping.gather_index).view(groups, length, x.shape[-1])
    all_slots = groups == a.shape[0]
    ag = a if all_slots else a.index_select(0, mapping.slots)
    shrunk = torch.bmm(xg, ag.transpose(1, 2)) * mapping.pad_mask
    parts = [torch.bmm(shrunk[:, :, j * rank:(j + 1) * rank], b if all_slots else b.index_select(0, mapping.slots))
             for j, b in enumerate(bs)]
    return out.index_add_(0, mapping.gather_index, torch.cat(parts, dim=-1).view(-1, out.shape[-1]))


class LoRALinearMethod(LinearMethod):
    """The base method plus the step's batched LoRA term."""

    prepackable = False  # wrapped after prepacking; the base method stays what it is

    def __init__(self, base: LinearMethod, weights: LoRASlotWeights) -> None:
        self.base = base
        self.weights = weights

    def load(self, layer, name, tensor, shard=None) -> None:
        self.base.load(layer, name, tensor, shard)

    def process_after_loading(self, layer) -> None:
        self.base.process_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        out = self.base.apply(layer, x, skip_bias)
        ctx = current_forward_context()
        mapping = None if ctx is None else ctx.lora
        if mapping is None:
            return out
        return self.weights.add(out, x, mapping)


class LoRAEmbedding(nn.Module):
    """The token embedding plus its LoRA term (added after the vocab-parallel all-reduce)."""

    def __init__(self, base: VocabEmbedding, max_loras: int, max_rank: int, dtype, device) -> None:
        super().__init__()
        self.base = base
        self.a_rows = torch.zeros(max_loras, base.vocab_size, max_rank, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, max_rank, base.hidden_size, dtype=dtype, device=device)
        self.has = [False] * max_loras

    def set_slot(self, slot: int, pieces: Optional[dict[str, LoRAPiece]]) -> None:
        self.a_rows[slot].zero_()
        self.b[slot].zero_()
        piece = (pieces or {}).get("")
        self.has[slot] = piece is not None
        if piece is not None:
            r = piece.rank
            self.a_rows[slot, :, :r].copy_(piece.lora_a.t())
            self.b[slot, :r].copy_(piece.lora_b.t())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        ctx = current_forward_context()
        mapping = None if ctx is None else ctx.lora
        if mapping is None or not any(self.has[s] for s in mapping.active):
            return out
        return out + embedding_lora(input_ids, self.a_rows, self.b, mapping).to(out.dtype)


class LoRALMHead(nn.Module):
    """The LM head plus its LoRA term. The head runs outside the layers' forward context, on the
    rows the runner picked, so the runner names those rows' slots first (`row_slots`, [rows])."""

    def __init__(self, base: LMHead, max_loras: int, max_rank: int, dtype, device) -> None:
        super().__init__()
        self.base = base
        self.a = torch.zeros(max_loras, max_rank, base.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, max_rank, base.vocab_size, dtype=dtype, device=device)
        self.has = [False] * max_loras
        self.row_slots: Optional[torch.Tensor] = None
        self.active: tuple[int, ...] = ()

    def set_slot(self, slot: int, pieces: Optional[dict[str, LoRAPiece]]) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        piece = (pieces or {}).get("")
        self.has[slot] = piece is not None
        if piece is not None:
            r = piece.rank
            self.a[slot, :r].copy_(piece.lora_a)
            self.b[slot, :r].copy_(piece.lora_b.t())

    def select_rows(self, mapping: Optional[LoRAMapping], index: Optional[torch.Tensor]) -> None:
        """The slots of the hidden rows `hidden[index]` the next call gets (None: no adapter)."""
        self.active = () if mapping is None else tuple(s for s in mapping.active if self.has[s])
        self.row_slots = None if not self.active else (
            mapping.token_slots if index is None else mapping.token_slots[index])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        if not self.active:
            return logits
        # Masked over the adapters in use: the rows are few (one per sampling request), the
        # vocabulary wide, so two small matmuls beat grouping rows by slot.
        active = torch.tensor(self.active, device=hidden.device)
        a, b = self.a.index_select(0, active), self.b.index_select(0, active)
        onehot = (self.row_slots[:, None] == active[None, :]).to(a.dtype)[:, :, None]
        shrunk = (hidden.to(a.dtype) @ a.reshape(-1, a.shape[-1]).t()).view(hidden.shape[0], len(self.active), -1)
        term = (shrunk * onehot).reshape(hidden.shape[0], -1) @ b.reshape(-1, b.shape[-1])
        logits[:, :term.shape[-1]] += term.float()
        return logits


def attach_lora(model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype,
                device: torch.device) -> dict[str, object]:
    """Wraps every LoRA-capable projection's method (and the embedding, the LM head) of a loaded model; returns
    the slot holders by module path (the names `adapter.load_adapter` produces)."""
    holders: dict[str, object] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in LORA_LAYER_NAMES:
            weights = LoRASlotWeights(module, max_loras, max_rank, dtype, device)
            module.method = LoRALinearMethod(module.method, weights)
            holders[name] = weights
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "embed_tokens", None), VocabEmbedding):
        inner.embed_tokens = LoRAEmbedding(inner.embed_tokens, max_loras, max_rank, dtype, device)
        holders["model.embed_tokens"] = inner.embed_tokens
    if isinstance(getattr(model, "lm_head", None), LMHead):
        model.lm_head = LoRALMHead(model.lm_head, max_loras, max_rank, dtype, device)
        holders[LM_HEAD_MODULE] = model.lm_head
    return holders
