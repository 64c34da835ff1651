"""Token embedding and the LM head (which may share the embedding's weight).

Under tensor parallelism both are vocab-parallel: each rank holds `vocab_per_rank` consecutive
rows of the (padded) vocabulary. The embedding looks up the ids in its rows, zeroes the others
and sums over the ranks; the LM head computes its rows' logits and gathers them, so every rank
has the full logits (and samples the same tokens). The vocabulary is padded to a multiple of
the rank count; padding rows are zero and their logits are sliced off.

Both may hold GGUF blocks instead of a dense weight (`load` given a `GGUFQuantizedTensor`): the
lookup then dequantizes only the looked-up rows, and the head runs the GGUF matmul kernel; a tied
head adopts its embedding's blocks. Under tensor parallelism a rank keeps its rows' blocks (ggml
rows are independent); padding rows are zero bytes, which every kernel type decodes as zeros.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.distributed.communication import tensor_parallel_all_gather, tensor_parallel_all_reduce
from pagellm.distributed.layout import padded_vocab_size
from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context
from pagellm.layers.linear_method import CpuPackedLinearMethod, UnquantizedLinearMethod
from pagellm.layers.quantization.gguf import GGUFLinearMethod, GGUFQuantizedTensor
from pagellm.ops.gguf_cpu import gguf_dequantize


def _adopt_blocks(module: nn.Module, tensor: GGUFQuantizedTensor) -> None:
    """Replaces the module's dense weight with the tensor's GGUF blocks (`qweight`, `ggml_type`)."""
    module.register_buffer("qweight", tensor.data, persistent=False)
    module.ggml_type = int(tensor.ggml_type)
    module.weight = None


def _keeps_blocks(module: nn.Module, tensor) -> bool:
    """Whether a checkpoint tensor stays quantized here: GGUF blocks (split by rows like a dense one)."""
    return isinstance(tensor, GGUFQuantizedTensor)


class VocabParallel:
    """The vocabulary rows [start, start + rows) this rank holds (all of them at tp_size 1)."""

    def __init__(self, vocab_size: int, parallel: Optional[ParallelContext]) -> None:
        self.parallel = parallel if parallel is not None else get_parallel_context()
        self.vocab_size = vocab_size
        self.rows = padded_vocab_size(vocab_size, self.parallel.tp_size) // self.parallel.tp_size
        self.start = self.parallel.tp_rank * self.rows

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a [vocab, hidden] checkpoint tensor, zero-padded past the vocabulary."""
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint {name} has shape {tuple(tensor.shape)}, expected {self.vocab_size} rows")
        if self.parallel.tp_size == 1:
            return tensor
        end = min(self.start + self.rows, self.vocab_size)
        if isinstance(tensor, GGUFQuantizedTensor):
            data = tensor.data[self.start:end]
            if data.shape[0] < self.rows:
                data = torch.cat([data, data.new_zeros(self.rows - data.shape[0], data.shape[1])])
            return GGUFQuantizedTensor(data.clone(), tensor.ggml_type, torch.Size((self.rows, tensor.shape[1])))
        part = tensor.narrow(0, self.start, max(0, end - self.start))  # a LazyTensor reads only these rows
        if part.shape[0] < self.rows:
            part = torch.cat([part, part.new_zeros(self.rows - part.shape[0], *part.shape[1:])])
        return part


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: Optional[ParallelContext] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab = VocabParallel(vocab_size, parallel)
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(self.vocab.rows, hidden_size), requires_grad=False)
        self.dtype = self.weight.dtype  # the lookup's output dtype, also once the weight is quantized
        self.register_buffer("qweight", None, persistent=False)  # GGUF blocks, once loaded quantized
        self.ggml_type = 0

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return F.embedding(ids, self.weight)
        rows = self.qweight.index_select(0, ids.reshape(-1))
        out = gguf_dequantize(rows, self.ggml_type, rows.shape[0], self.hidden_size)
        return out.view(*ids.shape, self.hidden_size).to(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.vocab.parallel.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.rows)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_parallel_all_reduce(out, self.vocab.parallel)  # each id is found on exactly one rank

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight":
            raise ValueError(f"the embedding has no parameter {name!r}")
        if _keeps_blocks(self, tensor):
            _adopt_blocks(self, self.vocab.shard(name, tensor))
            return
        if hasattr(tensor, "dequantize"):  # quantized, but not in blocks this layer keeps
            tensor = tensor.dequantize()
        self.weight.data.copy_(self.vocab.shard(name, tensor))


class LMHead(nn.Module):
    """The output projection; like a linear layer it applies its weight through a `LinearMethod`."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None,
                 parallel: Optional[ParallelContext] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        # Pipeline parallelism: tied in the checkpoint, but the embedding is on another stage, so
        # this head holds its own copy, loaded from the embedding's tensor.
        self.loads_tied_embedding = False
        # A tied head shares the embedding's rows, so it shares its split too.
        self.vocab = tied_to.vocab if tied_to is not None else VocabParallel(vocab_size, parallel)
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(
            torch.empty(self.vocab.rows, hidden_size), requires_grad=False)
        self.out_features, self.in_features = self.vocab.rows, hidden_size
        self.bias = None
        self.method = UnquantizedLinearMethod()
        self.packed: Optional[torch.Tensor] = None
        self.register_buffer("qweight", None, persistent=False)  # GGUF blocks, once loaded quantized
        self.ggml_type = 0
        # a plain list: the embedding is the model's submodule, not this head's
        self._tied_to = [tied_to] if tied_to is not None else []

    def _follow_tied_embedding(self) -> None:
        """A tied head whose embedding was loaded quantized multiplies with the same blocks."""
        if self._tied_to and self._tied_to[0].qweight is not None and self.qweight is None:
            embedding = self._tied_to[0]
            self.register_buffer("qweight", embedding.qweight, persistent=False)
            self.ggml_type = embedding.ggml_type
            self.weight = None
            self.method = GGUFLinearMethod()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 whatever the model dtype: sampling and logprobs need the precision."""
        self._follow_tied_embedding()
        logits = self.method.apply(self, hidden).float()
        if self.vocab.parallel.tp_size == 1:
            return logits
        logits = tensor_parallel_all_gather(logits, -1, self.vocab.parallel)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size].contiguous()

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name != "weight":
            raise ValueError(f"the LM head has no parameter {name!r}")
        if _keeps_blocks(self, tensor):
            _adopt_blocks(self, self.vocab.shard(name, tensor))
            self.method = GGUFLinearMethod()
            return
        if hasattr(tensor, "dequantize"):  # quantized, but not in blocks this layer keeps
            tensor = tensor.dequantize()
        self.weight.data.copy_(self.vocab.shard(name, tensor))

    def enable_int8_activations(self) -> None:
        """As `Linear.enable_int8_activations`: a quantized head (GGUF blocks) may use int8 activations."""
        self.int8_activations = True

    def prepack_for_cpu(self) -> None:
        """The LM head is the largest matmul of a small model, and the slowest through MKL.
        A tied head keeps the embedding's weight (the lookup needs it) next to the packed copy.
        A quantized head keeps its blocks."""
        self._follow_tied_embedding()
        if self.qweight is not None:
            return
        self.method = CpuPackedLinearMethod(keep_plain=self.tied)
        self.method.process_after_loading(self)
