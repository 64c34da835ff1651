"""Turns a SchedulerOutput into one forward pass plus sampling, on one device.

The runner's `InputBatch` mirrors each scheduled request (token ids, block table row, sampling
pieces) so the scheduler only sends what changed each step. Inputs are laid out as one flat
batch: request after request, each contributing the tokens scheduled for it. Only requests
whose scheduled tokens reach their end are sampled, at their last position.

    execute: prepare inputs -> forward -> sample (verify drafts) -> propose -> build output

Speculative decoding: a request scheduled with drafts (`SchedulerOutput.scheduled_spec_decode_tokens`)
is verified at all its draft positions by `pagellm/spec_decode/verify.py` and emits 1 .. k + 1
tokens; rows without drafts sample as in any step. With `speculative_config` the sampling runner
owns the proposer (`spec_decode/factory.py`) and returns the next drafts of the requests the
scheduler asks for (`ModelRunnerOutput.spec_token_ids`).

With pipeline parallelism the forward is this stage's part: a stage after the first receives
the previous stage's hidden states (and residual) instead of embedding the ids, a stage before
the last sends its outputs on and returns an empty output; only the last stage samples (its
runner holds the sampling state that matters: seeds, penalties' token counts).

The model comes from `model_loader.py`; the KV cache is sized and bound by the `Worker`
(`kv_cache.py`). The runner also runs the dummy steps the CUDA memory profile measures, and
captures the decode CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, build_metadata
from pagellm.attention.kv_quant import KVCacheFormat
from pagellm.attention.selector import select_attention_backend
from pagellm.config import EngineConfig
from pagellm.distributed.communication import pp_recv_tensors, pp_send_tensors
from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context
from pagellm.core.scheduler import SchedulerOutput
from pagellm.forward_context import set_forward_context
from pagellm.sample import Sampler, SamplingMetadata, SamplingRow, compute_logprobs_tensors, rows_to_lists
from pagellm.sampling_params import SamplingParams
from pagellm.spec_decode.verify import propose_drafts, verify
from pagellm.worker import kv_cache
from pagellm.worker.cuda_graphs import DecodeGraphs, capture_batch_sizes
from pagellm.worker.gpu_memory import MemoryProfile
from pagellm.worker.input_batch import CachedRequestState, InputBatch, StepInputs
from pagellm.worker.model_loader import DTYPES, load_model
from pagellm.worker.outputs import LogprobsLists, ModelRunnerOutput

logger = logging.getLogger(__name__)


def make_lora_manager(config: EngineConfig, model_config, model, dtype, device):
    """The worker's adapter slots (pagellm/lora/worker_manager.py), or None without enable_lora."""
    if not config.enable_lora:
        return None
    from pagellm.lora.worker_manager import LoRAManager

    return LoRAManager(model, model_config, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                       max_cpu_loras=config.lora_host_slots, dtype=dtype, device=device,
                       allow_bin=config.lora_allow_bin)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config, model: torch.nn.Module) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.model = model
        self.vocab_size = model_config.vocab_size
        self.block_size = config.block_size
        self.backend: AttentionBackend = select_attention_backend(config.attention_backend, self.device)
        self.attn_builder = self.backend.metadata_builder(config.max_model_len, self.device)
        # The pipeline stage this runner is (None without pipeline parallelism); built in the
        # rank's parallel context, like the model. Only the last stage samples.
        ctx = get_parallel_context()
        self.stage: Optional[ParallelContext] = ctx if ctx.pp_size > 1 else None
        self.samples = ctx.is_last_stage
        self.hidden_size = model_config.hidden_size
        self.sampler = Sampler()
        self.input_batch = InputBatch(config.max_num_seqs, config.max_model_len, self.block_size, self.vocab_size,
                                      self.device, samples=self.samples)
        self.num_blocks = 0  # set by the worker once the KV cache is allocated
        self.graphs: Optional[DecodeGraphs] = None
        self.memory_profile: Optional[MemoryProfile] = None
        self.graph_summary = ""  # one line for the start-up log once graphs are captured
        self.lora = make_lora_manager(config, model_config, model, self.dtype, self.device)
        self._step_lora = None  # the running step's LoRAMapping (the LM head needs its rows' adapters)
        # Speculative decoding's proposer lives with the sampling state (histories, seeds): the last
        # stage only. The draft model's inner runner gets speculative_config=None, so no recursion.
        self.proposer = None
        if config.speculative_config is not None and self.samples:
            from pagellm.spec_decode.factory import make_proposer

            self.proposer = make_proposer(config.speculative_config, config, target_vocab_size=self.vocab_size)
            if not self.proposer.deterministic:  # verification passes one-hot q (no draft probabilities)
                raise ValueError(f"speculative_config.method: {config.speculative_config.method!r} proposes "
                                 "sampled drafts, which the runner cannot verify yet")

    @classmethod
    def load(cls, config: EngineConfig, model_config, weights: Optional[Iterable], online=None) -> "ModelRunner":
        """A runner over the model built and filled by `model_loader.load_model` (`online`: an
        `OnlineQuantization` applied to the loaded linear weights)."""
        return cls(config, model_config, load_model(config, model_config, weights, online))

    @property
    def requests(self) -> dict[str, CachedRequestState]:
        return self.input_batch.requests

    # -- CUDA: memory profile and graphs ------------------------------------------------
    @property
    def uses_cuda_graphs(self) -> bool:
        # Graphs capture one whole-model forward; a pipeline stage's sends and receives are not captured.
        return (self.device.type == "cuda" and not self.config.enforce_eager and self.backend.supports_cuda_graphs
                and self.stage is None and self.lora is None)

    def profile_cuda_memory(self) -> MemoryProfile:
        graph_batch = capture_batch_sizes(self.config.max_num_seqs)[-1] if self.uses_cuda_graphs else 0
        return kv_cache.profile_cuda_memory(self.device, self.config, self.profile_run, graph_batch)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_reqs: int) -> int:
        """One dummy step (forward, logits, sampling) of num_tokens prompt tokens over num_reqs requests,
        on a temporary KV cache just big enough; returns that cache's size in bytes."""
        lens = [num_tokens // num_reqs] * num_reqs
        lens[0] += num_tokens % num_reqs
        block_ids, next_block = [], 0
        for n in lens:
            count = -(-n // self.block_size)
            block_ids.append(list(range(next_block, next_block + count)))
            next_block += count
        caches = kv_cache.allocate_kv_cache(self.model, self.backend, next_block, self.block_size, self.dtype,
                                            self.device, KVCacheFormat.from_config(self.config.kv_cache_dtype,
                                                                                   self.dtype))
        kv_bytes = sum(c.numel() * c.element_size() for c in caches)
        try:
            md = build_metadata(lens, [0] * num_reqs, block_ids, self.block_size, self.device)
            input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
            if self.stage is not None:
                # A stage's part alone: zeros in place of the previous stage's outputs, nothing sent.
                intermediate = None if self.stage.is_first_stage else {
                    name: torch.zeros(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
                    for name in self.model.intermediate_names}
                with set_forward_context(self.attn_builder.build(md)):
                    hidden = self.model(input_ids, positions, intermediate)
            else:
                hidden = self._forward(input_ids, positions, md, allow_graphs=False)
            if self.samples:
                # With speculation a step takes 1 + k logits rows per request (the verification's
                # peak); the last tokens stand in for the draft positions.
                spec = self.config.speculative_config
                per_req = 1 if spec is None else 1 + spec.num_speculative_tokens
                num_rows = min(num_tokens, num_reqs * per_req)
                if per_req == 1:
                    last = torch.tensor(md.query_start_loc[1:], device=self.device) - 1
                else:
                    last = torch.arange(num_tokens - num_rows, num_tokens, device=self.device)
                logits = self.model.compute_logits(hidden[last])
                rows = [SamplingRow(SamplingParams(), [], [], set()) for _ in range(num_rows)]
                meta = SamplingMetadata.build(rows, self.vocab_size, self.device)
                self.sampler(logits, meta)
                if per_req > 1:
                    self.sampler.distributions(logits, meta)
                del logits
            del hidden
        finally:
            del caches
            kv_cache.release_kv_cache(self.model)
        return kv_bytes

    def capture_cuda_graphs(self) -> None:
        """Captures decode-step graphs (CUDA with a graph-safe backend, unless enforce_eager); a draft
        model proposer captures its own. Steps with drafts (query length 1 + k) run eagerly."""
        draft_capture = getattr(self.proposer, "capture_cuda_graphs", None)
        if draft_capture is not None:
            line = draft_capture()
            if line:
                logger.info("draft model: %s", line)
        if not self.uses_cuda_graphs:
            return
        graphs = DecodeGraphs(self.model, self.config.max_num_seqs, self.config.max_model_len,
                              self.block_size, self.device, self.attn_builder)
        try:
            graphs.capture()
        except RuntimeError as exc:
            # A model whose forward syncs with the host (e.g. data-dependent expert routing) cannot be
            # captured; it still runs, eagerly.
            logger.warning("CUDA graph capture failed, decode steps run eagerly: %s", exc)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return
        self.graphs = graphs
        estimate = self.memory_profile.graph_pool_bytes if self.memory_profile else 0
        message = (f"CUDA graphs: {len(self.graphs.sizes)} decode batch sizes (1..{self.graphs.max_batch_size}) "
                   f"captured in {self.graphs.capture_seconds:.1f} s, pool {self.graphs.pool_bytes / 2**20:.0f} MiB "
                   f"(estimated {estimate / 2**20:.0f} MiB)")
        logger.info(message)
        if self.graphs.pool_bytes > estimate:
            logger.warning("the CUDA graph pool is larger than estimated at start-up; lower gpu_memory_utilization "
                           "if the GPU runs out of memory")
        self.graph_summary = message

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
                 allow_graphs: bool = True, lora=None) -> torch.Tensor:
        if allow_graphs and self.graphs is not None and self.graphs.can_run(md.num_reqs, md.max_query_len):
            return self.graphs.run(input_ids, positions, md)
        with set_forward_context(self.attn_builder.build(md), lora=lora):
            return self.model(input_ids, positions)

    # -- the step -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self.proposer is not None:
            for req_id in sched.finished_req_ids | sched.preempted_req_ids:
                self.proposer.request_finished(req_id)
        self.input_batch.update(sched)
        if sched.is_empty:
            return ModelRunnerOutput({})
        inputs = self.input_batch.prepare(sched)
        lora = None if self.lora is None else self.lora.prepare_step([s.lora_request for s in inputs.states],
                                                                    inputs.query_lens)
        if self.stage is None:
            hidden = self._forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, lora=lora)
        else:
            hidden = self._forward_stage(inputs, lora)
            if hidden is None:
                return ModelRunnerOutput({})  # sent on to the next stage
        self._step_lora = lora
        sampled, logprobs = self._sample(hidden, inputs, sched)
        prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        spec_tokens = {}
        if self.proposer is not None and inputs.sample_rows:
            spec_tokens = propose_drafts(self.proposer, [inputs.states[i] for i in inputs.sample_rows],
                                         sched.num_spec_tokens_to_propose)
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs, spec_tokens)

    def _forward_stage(self, inputs: StepInputs, lora=None) -> Optional[torch.Tensor]:
        """This stage's layers: the final hidden states on the last stage; elsewhere the outputs go
        to the next stage and None is returned. The shapes are known to both sides: every rank
        got the same SchedulerOutput (the step's token count) and the config (the hidden size)."""
        stage = self.stage
        intermediate = None
        if not stage.is_first_stage:
            shape = (inputs.input_ids.shape[0], self.hidden_size)
            intermediate = pp_recv_tensors(self.model.intermediate_names, shape, self.dtype, self.device, stage)
        with set_forward_context(self.attn_builder.build(inputs.attn_metadata), lora=lora):
            out = self.model(inputs.input_ids, inputs.positions, intermediate)
        if stage.is_last_stage:
            return out
        pp_send_tensors(out, stage)
        return None

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs,
                sched: SchedulerOutput) -> tuple[dict[str, list[int]], dict[str, LogprobsLists]]:
        """Next token(s) (and requested logprobs) of every sampling row, appended to its request's output.

        A step with drafts takes the logits of every draft position too; its plain rows still go
        through the Sampler, its draft rows through the rejection sampler (`spec_decode/verify.py`).
        """
        sampled: dict[str, list[int]] = {r: [] for r in inputs.req_ids}
        logprobs_out: dict[str, LogprobsLists] = {}
        if not inputs.sample_rows:
            return sampled, logprobs_out
        rows = [inputs.states[i] for i in inputs.sample_rows]
        plan = inputs.spec
        if plan is None:
            logits = self._logits(hidden, inputs.logits_indices)
            self._sample_plain(rows, logits, inputs.sampling_metadata, sched, sampled, logprobs_out)
            return sampled, logprobs_out
        logits = self._logits(hidden, plan.logits_indices)
        if plan.plain:
            self._sample_plain([rows[j] for j in plan.plain], logits[:plan.num_plain], plan.plain_meta, sched,
                               sampled, logprobs_out)
        spec_states = [rows[j] for j in plan.spec]
        emitted, spec_logprobs = verify(plan, logits[plan.num_plain:], self.sampler, spec_states)
        for state, tokens, lps in zip(spec_states, emitted, spec_logprobs):
            state.output_token_ids.extend(tokens)
            sampled[state.req_id] = tokens
            if lps is not None:
                logprobs_out[state.req_id] = lps
        return sampled, logprobs_out

    def _sample_plain(self, states: list[CachedRequestState], logits: torch.Tensor, meta: SamplingMetadata,
                      sched: SchedulerOutput, sampled: dict[str, list[int]],
                      logprobs_out: dict[str, LogprobsLists]) -> None:
        """One token per row through the Sampler (row j of `logits` is states[j])."""
        if sched.grammar_bitmask is not None:
            self._apply_grammar(sched, states, logits)
        out = self.sampler(logits, meta)
        # The sampled ids (and requested logprobs) are the step's only reads back to the host.
        tokens = out.sampled_token_ids.tolist()
        want = [j for j, state in enumerate(states) if state.sampling_params.logprobs is not None]
        lists = rows_to_lists(out.logprobs, want, out.logprobs.token_ids.shape[1] - 1) \
            if want and out.logprobs is not None else []
        by_row = dict(zip(want, lists))
        for j, state in enumerate(states):
            state.output_token_ids.append(tokens[j])
            sampled[state.req_id] = [tokens[j]]
            k = state.sampling_params.logprobs
            if j in by_row:
                ids, lps, rank = by_row[j]
                logprobs_out[state.req_id] = [(ids[:k + 1], lps[:k + 1], rank)]

    def _apply_grammar(self, sched: SchedulerOutput, states: list[CachedRequestState], logits: torch.Tensor) -> None:
        """Bans, in place, the tokens each constrained row's grammar forbids (and the padding columns
        past the vocabulary); row j of `logits` is states[j]. Done before the sampler, so greedy and
        random rows, and logprobs, all see the constrained distribution. Waits here for the bitmask
        the core filled during the forward. (Constrained requests never get drafts.)"""
        from pagellm.structured_output.bitmask import apply_bitmask_, resolve_bitmask

        bitmask = resolve_bitmask(sched.grammar_bitmask)
        logit_rows, bitmask_rows = [], []
        for j, state in enumerate(states):
            row = sched.grammar_rows.get(state.req_id)
            if row is not None:
                logit_rows.append(j)
                bitmask_rows.append(row)
        apply_bitmask_(logits, bitmask, logit_rows, bitmask_rows, min(self.vocab_size, logits.shape[1]))

    def _logits(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The LM head on `hidden[index]`, with the rows' adapters when the head has LoRA."""
        if self.lora is not None:
            self.lora.select_logit_rows(self._step_lora, index)
        return self.model.compute_logits(hidden[index])

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> dict[str, LogprobsLists]:
        """Logprobs of the prompt tokens each chunk predicts (teacher forcing), from raw logits."""
        result: dict[str, LogprobsLists] = {}
        query_start_loc = inputs.attn_metadata.query_start_loc
        for i, state in enumerate(inputs.states):
            k = state.sampling_params.prompt_logprobs
            if k is None:
                continue
            n_prompt = len(state.prompt_token_ids)
            ctx, qlen = inputs.context_lens[i], inputs.query_lens[i]
            # Position p predicts prompt token p + 1; only positions before the prompt's last token.
            last = min(ctx + qlen, n_prompt - 1)
            if last <= ctx:
                result[state.req_id] = []
                continue
            start = query_start_loc[i]
            logits = self._logits(hidden, torch.arange(start, start + (last - ctx), device=self.device))
            targets = torch.tensor(state.prompt_token_ids[ctx + 1:last + 1], device=self.device)
            tensors = compute_logprobs_tensors(logits, targets, k)
            result[state.req_id] = rows_to_lists(tensors, list(range(len(targets))), k)
        return result
