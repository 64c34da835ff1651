"""Draft-model proposer: a smaller model with the target's vocabulary guesses k tokens greedily.

The draft is a second instance of the engine's own worker pieces (`Worker` -> `ModelRunner`:
the same loader, GGUF or safetensors, quantization plan, attention backend and, on CUDA, decode
graphs) with its own paged KV cache of the target's block size, and a pure-Python block table
(`draft_kv.py`) over its own block pool.

Each propose call, for each request of the step:
  1. roll the draft's KV back to the longest common prefix of what it holds and the request's
     history (rejected proposals never reach a history; preemption may shorten it),
  2. reserve blocks for the history plus k - 1 proposals (a pool too short: that request gets
     no proposals this step, nothing fails),
  3. prefill the missing history tokens, batched over the requests (several tokens each, in
     forwards of at most max_num_batched_tokens tokens); the last token's logits give proposal 1,
  4. decode k - 1 more steps, batched, each feeding the previous proposal.
Proposals are argmaxes (`deterministic = True`): the rejection sampler treats q as one-hot, so
the output keeps exactly the target's distribution. After the call the draft holds the history
plus all but the last proposal; the next call keeps whatever of that was accepted.

Not thread-safe: one caller (the engine core's step loop) at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch

from pagellm.attention.backend import flat_positions, metadata_from_flat
from pagellm.config import EngineConfig
from pagellm.distributed.parallel_state import SINGLE_PROCESS, set_parallel_context
from pagellm.engine.setup import text_config
from pagellm.forward_context import set_forward_context
from pagellm.loader import default_model_path, load_hf_config, resolve_model_source
from pagellm.spec_decode.config import SpeculativeConfig
from pagellm.spec_decode.draft_kv import DraftBlockTable, cdiv
from pagellm.spec_decode.proposer import Proposer
from pagellm.worker.worker import Worker

logger = logging.getLogger(__name__)

DEFAULT_KV_FRACTION = 0.25
_ANONYMOUS = "\x00draft-anonymous-"  # ids for calls without req_ids (freed before returning)


@dataclasses.dataclass
class _Row:
    """One request's part of a propose call."""

    index: int  # position in the call's lists
    req_id: str
    history: Sequence[int]
    k: int  # proposals to make
    proposals: list[int] = dataclasses.field(default_factory=list)


def _model_config(model: str, load_format: str, key: str):
    try:
        source = resolve_model_source(model, load_format)
        return source, text_config(load_hf_config(source))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{key}: cannot load the model config of {model!r}: {exc}") from None


class DraftModelProposer(Proposer):
    deterministic = True

    def __init__(self, engine_config: EngineConfig, spec_config: SpeculativeConfig, *,
                 num_blocks: Optional[int] = None, kv_fraction: float = DEFAULT_KV_FRACTION,
                 target_vocab_size: Optional[int] = None) -> None:
        """`engine_config`: the target's resolved config (device, dtype, block size, max_model_len,
        max_num_batched_tokens; the draft also takes its load format, quantization, KV-cache dtype
        and attention backend). The draft's KV pool is `num_blocks` blocks, or else `kv_fraction` of
        the target's CPU KV budget (`kv_cache_memory`) / of the CUDA memory free now, capped at what
        max_num_seqs full-length requests could use. `target_vocab_size`: skips re-reading the
        target's config."""
        if spec_config.method != "draft_model" or not spec_config.model:
            raise ValueError(f"speculative_config.method: DraftModelProposer needs method 'draft_model' with a "
                             f"model, got {spec_config.method!r} / {spec_config.model!r}")
        if engine_config.device not in ("cpu", "cuda") or engine_config.max_model_len is None \
                or engine_config.max_num_batched_tokens is None or engine_config.dtype == "auto":
            raise ValueError("DraftModelProposer needs the target's resolved EngineConfig (EngineConfig.resolve)")
        self.k = spec_config.num_speculative_tokens
        source, draft_hf = _model_config(spec_config.model, engine_config.load_format, "speculative_config.model")
        if target_vocab_size is None:
            _, target_hf = _model_config(engine_config.model or default_model_path(), engine_config.load_format,
                                         "model")
            target_vocab_size = target_hf.vocab_size
        if draft_hf.vocab_size != target_vocab_size:
            raise ValueError(f"speculative_config.model: the draft model {spec_config.model!r} has a vocabulary of "
                             f"{draft_hf.vocab_size} tokens but the target's has {target_vocab_size}; a draft "
                             "model must share the target's tokenizer")
        self.vocab_size = draft_hf.vocab_size
        draft_limit = getattr(draft_hf, "max_position_embeddings", None) or engine_config.max_model_len
        # Past the draft's own limit it proposes nothing (the target still decodes those requests).
        self.max_len = min(engine_config.max_model_len, draft_limit)
        if draft_limit < engine_config.max_model_len:
            logger.warning("speculative_config.model: the draft model's context (%d tokens) is shorter than "
                           "max_model_len (%d); requests past it get no proposals", draft_limit,
                           engine_config.max_model_len)
        # One device, no adapters, no speculation of its own; the target's geometry and numerics.
        self.config = dataclasses.replace(
            engine_config, model=spec_config.model, tokenizer=None, max_model_len=self.max_len,
            speculative_config=None, enable_lora=False, tensor_parallel_size=1, pipeline_parallel_size=1,
            data_parallel_size=1, distributed_executor_backend="uni")
        self.block_size = self.config.block_size
        with set_parallel_context(SINGLE_PROCESS):  # a whole draft model, whatever rank builds it
            self.worker = Worker(self.config, draft_hf)
            self.worker.load_model(source)
        self.runner = self.worker.model_runner
        self.device = self.runner.device
        num_blocks = self._pool_size(num_blocks, kv_fraction)
        self.worker.initialize_kv_cache(num_blocks)
        self.table = DraftBlockTable(num_blocks, self.block_size)
        logger.info("draft model %s: %d KV blocks x %d tokens, k=%d", spec_config.model, num_blocks,
                    self.block_size, self.k)

    def _pool_size(self, num_blocks: Optional[int], kv_fraction: float) -> int:
        if num_blocks is not None:
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
                raise ValueError(f"num_blocks: the draft's KV pool needs at least one block, got {num_blocks!r}")
            return num_blocks
        if not 0.0 < kv_fraction <= 1.0:
            raise ValueError(f"kv_fraction: must be in (0, 1], got {kv_fraction!r}")
        per_block = self.worker.kv_bytes_per_token() * self.block_size
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0]
        else:
            budget = self.config.kv_cache_memory
        useful = self.config.max_num_seqs * cdiv(self.max_len, self.block_size)
        blocks = min(int(budget * kv_fraction) // per_block, useful)
        if blocks < 1:
            raise ValueError(f"kv_fraction: {kv_fraction} of {budget} bytes is less than one draft KV block "
                             f"({per_block} bytes)")
        return blocks

    # -- the proposer interface ---------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.table.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.table.num_free_blocks

    @torch.inference_mode()
    def propose(self, histories: Sequence[Sequence[int]], num_tokens: Sequence[int],
                req_ids: Optional[Sequence[str]] = None,
                prompt_lens: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Up to num_tokens[i] greedy draft tokens after histories[i]. With `req_ids` the draft keeps
        each request's KV for the next call (until `request_finished`); without, nothing is kept."""
        if len(num_tokens) != len(histories):
            raise ValueError(f"num_tokens: {len(num_tokens)} entries for {len(histories)} histories")
        anonymous = req_ids is None
        if anonymous:
            req_ids = [f"{_ANONYMOUS}{i}" for i in range(len(histories))]
        elif len(req_ids) != len(histories) or len(set(req_ids)) != len(req_ids):
            raise ValueError(f"req_ids: need {len(histories)} distinct ids, one per history, got {list(req_ids)!r}")
        rows: list[_Row] = []
        try:
            rows = self._admit(histories, num_tokens, req_ids)
            if rows:
                self._prefill(rows)
                self._decode(rows)
        finally:
            for row in rows:
                self.table.release_unused(row.req_id)  # a step that failed midway leaves no stray blocks
            if anonymous:
                for req_id in req_ids:
                    self.table.free(req_id)
        out: list[list[int]] = [[] for _ in histories]
        for row in rows:
            out[row.index] = row.proposals
        return out

    def request_finished(self, req_id: str) -> None:
        self.table.free(req_id)

    # -- the steps --------------------------------------------------------------------
    def _admit(self, histories, num_tokens, req_ids) -> list[_Row]:
        """Rolls each request back to what still matches, reserves its blocks; the requests that
        will get proposals."""
        rows = []
        for i, (history, k, req_id) in enumerate(zip(histories, num_tokens, req_ids)):
            # The target verifies at positions up to len + k - 1, which must stay under max_len.
            k = min(int(k), self.max_len - len(history))
            if k <= 0 or len(history) == 0:
                continue
            self.table.rollback(req_id, history)
            if not self.table.reserve(req_id, len(history) + k - 1):
                self.table.release_unused(req_id)
                continue  # the draft's pool is full: no proposals for this request now
            rows.append(_Row(i, req_id, history, k))
        return rows

    def _prefill(self, rows: list[_Row]) -> None:
        """Feeds each request's history past what the draft holds; proposal 1 from its last token."""
        budget = self.config.max_num_batched_tokens
        segments: list[tuple[_Row, int, list[int]]] = []
        used = 0
        for row in rows:
            start = self.table.num_held(row.req_id)
            while start < len(row.history):
                n = min(len(row.history) - start, budget - used)
                segments.append((row, start, list(row.history[start:start + n])))
                used += n
                start += n
                if used == budget:  # a long history continues in the next forward
                    self._run_segments(segments)
                    segments, used = [], 0
        if segments:
            self._run_segments(segments)

    def _decode(self, rows: list[_Row]) -> None:
        for step in range(1, max(row.k for row in rows)):
            batch = [row for row in rows if len(row.proposals) < row.k]
            self._run_segments([(row, len(row.history) + step - 1, [row.proposals[-1]]) for row in batch])

    def _run_segments(self, segments: list[tuple[_Row, int, list[int]]]) -> None:
        """One forward over (request, context length, new tokens) segments; a segment reaching the
        end of what its request has appends the argmax at its last token to the proposals."""
        query_lens = [len(tokens) for _, _, tokens in segments]
        context_lens = [start for _, start, _ in segments]
        blocks = [self.table.blocks[row.req_id] for row, _, _ in segments]
        table = torch.zeros((len(segments), max(len(b) for b in blocks)), dtype=torch.int32)
        for i, row_blocks in enumerate(blocks):
            table[i, :len(row_blocks)] = torch.tensor(row_blocks, dtype=torch.int32)
        req_index, positions = flat_positions(torch.tensor(query_lens), torch.tensor(context_lens))
        md = metadata_from_flat(query_lens, context_lens, req_index, positions, table, self.block_size, self.device)
        input_ids = torch.tensor([t for _, _, tokens in segments for t in tokens], dtype=torch.long,
                                 device=self.device)
        hidden = self._forward(input_ids, positions.to(self.device), md)
        last = torch.tensor(md.query_start_loc[1:], device=self.device) - 1
        logits = self.runner.model.compute_logits(hidden[last])[:, :self.vocab_size]
        next_tokens = logits.argmax(dim=-1).tolist()  # the call's one read back per forward
        for (row, start, tokens), token in zip(segments, next_tokens):
            self.table.append(row.req_id, tokens)
            if start + len(tokens) >= len(row.history):
                row.proposals.append(token)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md) -> torch.Tensor:
        graphs = self.runner.graphs
        if graphs is not None and graphs.can_run(md.num_reqs, md.max_query_len):
            return graphs.run(input_ids, positions, md)
        with set_forward_context(self.runner.attn_builder.build(md)):
            return self.runner.model(input_ids, positions)

    def capture_cuda_graphs(self) -> str:
        """Decode-step CUDA graphs for the draft (CUDA, unless enforce_eager); their log line, or ''."""
        return self.worker.compile_or_warm_up_model()
