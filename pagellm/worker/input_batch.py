"""The requests a model runner holds, kept across steps, and the flat inputs of each step.

The scheduler sends only what changed (new requests, new blocks and computed counts of cached
ones, finished and preempted ids). Each held request owns a row of persistent host buffers (its
block table, its sampling pieces); rows freed by finished or preempted requests are refilled
by condensing, so rows 0..n-1 are always the live ones. A step's flat batch follows the
scheduler's order (cached requests, then new ones) whatever the rows are: positions, slot
mapping and block tables are built from the persistent buffers with tensor ops, once per step.
A request with speculative drafts feeds them after its last token for that step only (its state
never holds them); `spec_decode/verify.py` lays out such a step's logits rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pagellm.attention.backend import AttentionMetadata, flat_positions, metadata_from_flat
from pagellm.core.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from pagellm.sample.metadata import SamplingMetadata, SamplingMetadataBuilder, SamplingRow
from pagellm.sampling_params import SamplingParams
from pagellm.spec_decode.verify import VerifyPlan, plan_verification


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: set[int]
    block_ids: list[int]
    num_computed_tokens: int
    generator: Optional[torch.Generator]
    lora_request: Optional[object] = None  # a pagellm.lora.LoRARequest, or None for the base model

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        # Slices each list on its own: concatenating prompt + output every step would copy the
        # whole sequence per decode token.
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt:end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n_prompt]


@dataclass
class StepInputs:
    """One step's flat batch: row i of the lists is request req_ids[i]."""

    req_ids: list[str]
    states: list[CachedRequestState]
    query_lens: list[int]
    context_lens: list[int]
    input_ids: torch.Tensor  # [T] long, on the device
    positions: torch.Tensor  # [T] long, on the device
    attn_metadata: AttentionMetadata  # common metadata; the backend's builder turns it into its own
    sample_rows: list[int]  # rows whose scheduled tokens reach their end (they sample this step)
    logits_indices: Optional[torch.Tensor]  # [S] flat index of each sampling row's last token
    sampling_metadata: Optional[SamplingMetadata]
    # A step with speculative drafts: its logits rows and sampling tensors (logits_indices and
    # sampling_metadata are then None).
    spec: Optional[VerifyPlan] = None


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int, vocab_size: int,
                 device: torch.device, samples: bool = True) -> None:
        self.block_size = block_size
        # False on a pipeline stage that does not sample: no seeds' generators, no sampling rows.
        self.samples = samples
        self.device = torch.device(device)
        self.requests: dict[str, CachedRequestState] = {}
        self.row_of: dict[str, int] = {}
        self.row_req: list[Optional[str]] = []  # row -> request id; None = a hole until condense()
        max_blocks = -(-max_model_len // block_size)
        self.block_table = torch.zeros((max(max_num_reqs, 1), max(max_blocks, 1)), dtype=torch.int32)
        self.num_blocks: list[int] = [0] * self.block_table.shape[0]  # block ids held per row
        self.sampling = SamplingMetadataBuilder(vocab_size, device)

    @property
    def num_reqs(self) -> int:
        return len(self.requests)

    # -- diffs from the scheduler -------------------------------------------------------
    def update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.remove_request(req_id)
        for new in sched.scheduled_new_reqs:
            self.add_request(new)
        for cached in sched.scheduled_cached_reqs:
            self.update_request(cached)
        self.condense()

    def add_request(self, new: NewRequestData) -> None:
        params = new.sampling_params
        generator = None
        if params.seed is not None and self.samples:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        state = CachedRequestState(new.req_id, list(new.prompt_token_ids), list(new.output_token_ids), params,
                                   set(new.eos_token_ids), list(new.block_ids), new.num_computed_tokens, generator,
                                   new.lora_request)
        if new.req_id in self.requests:
            self.remove_request(new.req_id)
        row = self._free_row()
        self.requests[new.req_id] = state
        self.row_of[new.req_id] = row
        self.row_req[row] = new.req_id
        self.block_table[row].zero_()
        self.num_blocks[row] = 0
        self._append_blocks(row, state.block_ids)
        if not self.samples:
            return
        # The sampling pieces read this state's output list, which grows in place each step.
        self.sampling.add_request(new.req_id, SamplingRow(params, state.prompt_token_ids, state.output_token_ids,
                                                          state.eos_token_ids, generator))

    def update_request(self, cached: CachedRequestData) -> None:
        state = self.requests[cached.req_id]
        row = self.row_of[cached.req_id]
        if cached.num_kept_blocks is not None and cached.num_kept_blocks < len(state.block_ids):
            # The scheduler took back the blocks of rejected speculative proposals.
            del state.block_ids[cached.num_kept_blocks:]
            self.block_table[row, cached.num_kept_blocks:self.num_blocks[row]] = 0
            self.num_blocks[row] = cached.num_kept_blocks
        state.block_ids.extend(cached.new_block_ids)
        state.num_computed_tokens = cached.num_computed_tokens
        if cached.new_token_ids:
            # Pipeline parallelism: the tokens the last stage sampled (that stage has them already).
            # Assigned in place: the sampling row reads this list.
            start = cached.num_output_tokens - len(cached.new_token_ids)
            state.output_token_ids[start:] = cached.new_token_ids
        self._append_blocks(row, cached.new_block_ids)

    def remove_request(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is None:
            return
        row = self.row_of.pop(req_id)
        self.row_req[row] = None
        self.num_blocks[row] = 0
        self.sampling.remove_request(req_id)

    def condense(self) -> None:
        """Moves the last live rows into the holes, so rows 0..num_reqs-1 are the live ones."""
        hole = 0
        while True:
            while self.row_req and self.row_req[-1] is None:
                self.row_req.pop()
            try:
                hole = self.row_req.index(None, hole)
            except ValueError:
                return
            last = len(self.row_req) - 1  # live (trailing holes are gone), and after the hole
            req_id = self.row_req.pop()
            self.block_table[hole] = self.block_table[last]
            self.block_table[last].zero_()
            self.num_blocks[hole], self.num_blocks[last] = self.num_blocks[last], 0
            self.row_req[hole], self.row_of[req_id] = req_id, hole

    def _free_row(self) -> int:
        for row, req_id in enumerate(self.row_req):
            if req_id is None:
                return row
        self.row_req.append(None)
        row = len(self.row_req) - 1
        if row >= self.block_table.shape[0]:  # more held requests than max_num_seqs: grow
            self._grow(rows=2 * self.block_table.shape[0], cols=self.block_table.shape[1])
        return row

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start, end = self.num_blocks[row], self.num_blocks[row] + len(block_ids)
        if end > self.block_table.shape[1]:
            self._grow(rows=self.block_table.shape[0], cols=max(end, 2 * self.block_table.shape[1]))
        self.block_table[row, start:end] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_blocks[row] = end

    def _grow(self, rows: int, cols: int) -> None:
        table = torch.zeros((rows, cols), dtype=torch.int32)
        old_rows, old_cols = self.block_table.shape
        table[:old_rows, :old_cols] = self.block_table
        self.block_table = table
        self.num_blocks += [0] * (rows - old_rows)

    # -- one step's inputs ----------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        """The step's flat batch (without sampling tensors on a stage that does not sample)."""
        req_ids = [c.req_id for c in sched.scheduled_cached_reqs] + [n.req_id for n in sched.scheduled_new_reqs]
        states = [self.requests[r] for r in req_ids]
        query_lens = [sched.num_scheduled_tokens[r] for r in req_ids]
        context_lens = [s.num_computed_tokens for s in states]
        rows = [self.row_of[r] for r in req_ids]
        max_blocks = max(max(self.num_blocks[row] for row in rows), 1)
        # Rows are zero past each request's blocks, so this is the padded table of the step.
        table = self.block_table[torch.tensor(rows, dtype=torch.long), :max_blocks]
        req_index, positions = flat_positions(torch.tensor(query_lens, dtype=torch.long),
                                              torch.tensor(context_lens, dtype=torch.long))
        md = metadata_from_flat(query_lens, context_lens, req_index, positions, table, self.block_size, self.device)
        # Speculative drafts follow a request's last token; they are input for this step only.
        drafts = sched.scheduled_spec_decode_tokens
        num_drafts = [len(drafts.get(r) or ()) for r in req_ids] if drafts else [0] * len(req_ids)
        input_ids: list[int] = []
        for r, state, ctx, qlen, nd in zip(req_ids, states, context_lens, query_lens, num_drafts):
            input_ids.extend(state.token_slice(ctx, ctx + qlen - nd))
            if nd:
                input_ids.extend(drafts[r])
        input_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = positions.to(self.device)

        # Sampling tensors are built before the forward is launched, so these host-to-device copies
        # do not wait for it.
        sample_rows = [i for i, (s, ctx, q, nd) in enumerate(zip(states, context_lens, query_lens, num_drafts))
                       if ctx + q - nd == s.num_tokens]
        logits_indices = meta = spec = None
        if sample_rows and self.samples:
            if any(num_drafts):
                spec = plan_verification(req_ids, sample_rows, num_drafts, drafts, md.query_start_loc,
                                         self.sampling, self.device)
            else:
                logits_indices = torch.tensor([md.query_start_loc[i + 1] - 1 for i in sample_rows],
                                              device=self.device)
                meta = self.sampling.build([req_ids[i] for i in sample_rows])
        return StepInputs(req_ids, states, query_lens, context_lens, input_t, pos_t, md, sample_rows,
                          logits_indices, meta, spec)
