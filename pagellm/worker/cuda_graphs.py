"""CUDA graphs for decode-only steps.

A decode step launches hundreds of small kernels; replaying them from a graph removes the
per-launch CPU cost. Graphs are captured once at start-up for a set of padded batch sizes.
Each reads static input buffers (token ids, positions, slot mapping, block tables, sequence
lengths, query start offsets) which the runner fills before a replay. Padding rows get slot
-1 (nothing written) and sequence length 0 (nothing read), so they cost a few idle programs.
All graphs share one memory pool; they are captured largest first so smaller ones reuse it.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from pagellm.attention.backend import AttentionMetadata, AttentionMetadataBuilder
from pagellm.forward_context import set_forward_context

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_num_seqs: int, limit: int = 512) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (capped at `limit`), which is always included."""
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def padded_batch_size(sizes: list[int], num_reqs: int) -> int | None:
    """The smallest captured size that holds num_reqs, or None when the batch is larger than all of them."""
    for size in sizes:
        if size >= num_reqs:
            return size
    return None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, builder: AttentionMetadataBuilder | None = None) -> None:
        self.model = model
        # The backend's metadata builder: captures see the metadata eager steps of that shape would.
        self.builder = builder or AttentionMetadataBuilder()
        self.sizes = capture_batch_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token per request
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self.pool_bytes = 0

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, batch: int):
        # Host lists describe the padded shape only; the Triton backend reads the static tensors.
        common = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch], query_start_loc=list(range(batch + 1)),
            seq_lens=[0] * batch, context_lens=[0] * batch, block_tables=self.block_tables[:batch],
            seq_lens_tensor=self.seq_lens[:batch], decode_indices=list(range(batch)), prefill_indices=[],
            query_start_loc_tensor=self.query_start_loc[:batch + 1], max_query_len=1,
            # Any replay's sequences are at most max_model_len long.
            max_seq_len=self.max_model_len)
        return self.builder.build(common)

    @torch.inference_mode()
    def capture(self) -> None:
        device = self.input_ids.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for batch in tqdm(list(reversed(self.sizes)), desc="Capturing CUDA graphs", leave=False):
            md = self._metadata(batch)
            with set_forward_context(md):
                self.model(self.input_ids[:batch], self.positions[:batch])  # warm-up: compiles kernels
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                with set_forward_context(md):
                    self.outputs[batch] = self.model(self.input_ids[:batch], self.positions[:batch])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = torch.cuda.memory_allocated(device) - before
        logger.info("captured %d CUDA graphs (batch sizes %s) in %.1f s, %.2f GiB",
                    len(self.graphs), self.sizes, self.capture_seconds, self.pool_bytes / 2**30)

    def can_run(self, num_reqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and 0 < num_reqs <= self.max_batch_size

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Hidden states of a decode-only step ([num_reqs, H]) from the smallest graph that holds it."""
        n = input_ids.shape[0]
        batch = padded_batch_size(self.sizes, n)
        assert batch is not None, "can_run() should have been checked"
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(md.slot_mapping)
        self.slot_mapping[n:batch].fill_(-1)
        self.seq_lens[:n].copy_(md.seq_lens_tensor)
        self.seq_lens[n:batch].zero_()
        # Columns past the request's blocks keep stale ids: the kernel never reads past seq_len.
        self.block_tables[:n, :md.block_tables.shape[1]].copy_(md.block_tables)
        self.graphs[batch].replay()
        return self.outputs[batch][:n]
