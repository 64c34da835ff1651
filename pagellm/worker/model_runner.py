"""Turns a SchedulerOutput into one forward pass plus sampling.

The runner keeps a small mirror of each scheduled request (its token ids, block ids,
sampling state) so the scheduler only sends what changed each step. Inputs are laid out
as one flat batch: request after request, each contributing the tokens scheduled for it.
Only requests whose scheduled tokens reach their end are sampled, at their last position.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, build_metadata
from pagellm.attention.layer import Attention
from pagellm.attention.selector import select_attention_backend
from pagellm.config import EngineConfig
from pagellm.core.scheduler import SchedulerOutput
from pagellm.forward_context import set_forward_context
from pagellm.layers.linear import cpu_prepack_available, prepack_cpu_weights
from pagellm.sample import LogprobsTensors, Sampler, SamplingMetadata, SamplingRow, compute_logprobs_tensors
from pagellm.loader.dummy import initialize_dummy_weights
from pagellm.models.registry import get_model_class
from pagellm.ops.cpu import enable_cpu_kernels, load_cpu_ops
from pagellm.sampling_params import SamplingParams
from pagellm.worker.cuda_graphs import DecodeGraphs, capture_batch_sizes
from pagellm.worker.gpu_memory import MemoryProfile, kv_cache_num_blocks

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Per position: (token ids [chosen, top-1, ...], their logprobs, rank of the chosen token).
LogprobsLists = list[tuple[list[int], list[float], int]]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]  # empty list for a mid-prompt chunk
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Per prompt chunk: logprobs of prompt tokens ctx+1 .. ctx+q_len (the ones this chunk predicts).
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)


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


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_hidden_layers * num_kv_heads * head_dim * elem


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
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.graphs: Optional[DecodeGraphs] = None
        self.memory_profile: Optional[MemoryProfile] = None
        self.graph_summary = ""  # one line for the start-up log once graphs are captured

    # -- start-up -----------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, model_config, weights) -> "ModelRunner":
        """Builds the model for `model_config` and fills it from `weights` (HF-named tensors).

        With `load_format="dummy"` the weights are random (seeded by `config.seed`) and `weights`
        is not read (it may be None): benchmarks of large shapes without checkpoint files.
        """
        model_cls = get_model_class(model_config)
        dtype = DTYPES[config.dtype]
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        dummy = config.load_format == "dummy"
        try:
            # Dummy weights are built and filled on the device: an 8B model's random init takes
            # seconds there, minutes on the CPU, and never needs a CPU copy.
            with torch.device(config.device) if dummy else contextlib.nullcontext():
                model = model_cls(model_config, config.max_model_len)
        finally:
            torch.set_default_dtype(previous)
        if dummy:
            model = model.eval()
            initialize_dummy_weights(model, config.seed)
        else:
            model.load_weights(weights)
            model = model.to(torch.device(config.device)).eval()
        if config.device == "cpu" and config.cpu_weight_prepack:
            if cpu_prepack_available(dtype):
                logger.info("prepacked %d linear layers for oneDNN", prepack_cpu_weights(model))
            else:
                logger.warning("cpu_weight_prepack: oneDNN cannot pack %s weights with this torch build and CPU; "
                               "using plain matmuls", config.dtype)
        if config.device == "cpu" and config.cpu_fused_ops and load_cpu_ops():
            logger.info("C++ CPU kernels for %d norm/activation layers", enable_cpu_kernels(model))
        return cls(config, model_config, model)

    def determine_num_blocks(self) -> int:
        per_token = kv_bytes_per_token(self.model_config, self.dtype)
        per_block = per_token * self.block_size
        if self.device.type == "cuda":
            self.memory_profile = self.profile_cuda_memory()
            num_blocks = kv_cache_num_blocks(self.memory_profile, self.config.gpu_memory_utilization, per_block,
                                             self.block_size, self.config.max_model_len)
            logger.info("GPU memory profile: %s -> %d KV blocks (%d tokens)", self.memory_profile.describe(),
                        num_blocks, num_blocks * self.block_size)
            return num_blocks
        budget = self.config.kv_cache_memory
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one block ({per_block} bytes); "
                             "raise kv_cache_memory / gpu_memory_utilization")
        return int(num_blocks)

    # -- CUDA: memory profile and graphs ------------------------------------------------
    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.supports_cuda_graphs

    def profile_cuda_memory(self) -> MemoryProfile:
        """Weights, the activation peak at max_num_batched_tokens, a graph-pool estimate, memory outside torch."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(dev)
        tokens = self.config.max_num_batched_tokens
        num_reqs = max(min(self.config.max_num_seqs, tokens), -(-tokens // self.config.max_model_len))
        peak = self._peak_bytes(lambda: self.profile_run(tokens, num_reqs), weights)
        graph_pool = 0
        if self.uses_cuda_graphs:
            # The graphs share one pool, about one decode step's activations at the largest batch.
            batch = capture_batch_sizes(self.config.max_num_seqs)[-1]
            graph_pool = self._peak_bytes(lambda: self.profile_run(batch, batch), weights)
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = max(total - free - torch.cuda.memory_reserved(dev), 0)
        return MemoryProfile(total, weights, peak, graph_pool, non_torch)

    def _peak_bytes(self, run, baseline: int) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        kv_bytes = run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline - kv_bytes
        torch.cuda.empty_cache()
        return max(peak, 0)

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
        self.initialize_kv_cache(next_block)
        kv_bytes = sum(c.numel() * c.element_size() for c in self.kv_caches)
        try:
            md = build_metadata(lens, [0] * num_reqs, block_ids, self.block_size, self.device)
            input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
            positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
            hidden = self._forward(input_ids, positions, md, allow_graphs=False)
            last = torch.tensor(md.query_start_loc[1:], device=self.device) - 1
            logits = self.model.compute_logits(hidden[last])
            rows = [SamplingRow(SamplingParams(), [], [], set()) for _ in lens]
            self.sampler(logits, SamplingMetadata.build(rows, self.vocab_size, self.device))
            del hidden, logits
        finally:
            self._release_kv_cache()
        return kv_bytes

    def capture_cuda_graphs(self) -> None:
        """Captures decode-step graphs (CUDA with a graph-safe backend, unless enforce_eager)."""
        if not self.uses_cuda_graphs:
            return
        graphs = DecodeGraphs(self.model, self.config.max_num_seqs, self.config.max_model_len,
                              self.block_size, self.device)
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
                 allow_graphs: bool = True) -> torch.Tensor:
        if md.max_query_len == 1 and self.device.type == "cuda":
            # Decode-only: split-KV is chosen from the batch shape alone, as in the captured graphs,
            # so eager and graph decode run the same kernels.
            md.max_seq_len = self.config.max_model_len
        if allow_graphs and self.graphs is not None and self.graphs.can_run(md.num_reqs, md.max_query_len):
            return self.graphs.run(input_ids, positions, md)
        with set_forward_context(md):
            return self.model(input_ids, positions)

    def _release_kv_cache(self) -> None:
        for layer in self.model.modules():
            if isinstance(layer, Attention):
                layer.kv_cache = None
        self.kv_caches = []
        self.num_blocks = 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_caches = []
        for layer in attn_layers:
            shape = self.backend.kv_cache_shape(num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.kv_cache = cache
            layer.backend = self.backend
            self.kv_caches.append(cache)

    # -- the step -------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.prompt_token_ids), list(new.output_token_ids), params,
                set(new.eos_token_ids), list(new.block_ids), new.num_computed_tokens, generator)
        for cached in sched.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput({})
        req_ids = [c.req_id for c in sched.scheduled_cached_reqs] + [n.req_id for n in sched.scheduled_new_reqs]
        states = [self.requests[r] for r in req_ids]
        query_lens = [sched.num_scheduled_tokens[r] for r in req_ids]
        context_lens = [s.num_computed_tokens for s in states]

        input_ids: list[int] = []
        positions: list[int] = []
        for state, ctx, qlen in zip(states, context_lens, query_lens):
            input_ids.extend(state.token_slice(ctx, ctx + qlen))
            positions.extend(range(ctx, ctx + qlen))
        md = build_metadata(query_lens, context_lens, [s.block_ids for s in states], self.block_size, self.device)
        input_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)

        # Rows to sample: requests whose scheduled tokens reach the end of what they have. Their
        # sampling tensors are built before the forward is launched, so these host-to-device copies
        # do not wait for it; the sampled ids (and requested logprobs) are the step's only reads back.
        sample_rows = [i for i, (s, ctx, q) in enumerate(zip(states, context_lens, query_lens)) if ctx + q == s.num_tokens]
        if sample_rows:
            last_token_idx = torch.tensor([md.query_start_loc[i + 1] - 1 for i in sample_rows], device=self.device)
            rows = [SamplingRow(states[i].sampling_params, states[i].prompt_token_ids, states[i].output_token_ids,
                                states[i].eos_token_ids, states[i].generator) for i in sample_rows]
            meta = SamplingMetadata.build(rows, self.vocab_size, self.device)
        hidden = self._forward(input_t, pos_t, md)

        sampled: dict[str, list[int]] = {r: [] for r in req_ids}
        logprobs_out: dict[str, LogprobsLists] = {}
        if sample_rows:
            logits = self.model.compute_logits(hidden[last_token_idx])
            out = self.sampler(logits, meta)
            tokens = out.sampled_token_ids.tolist()
            want = [j for j, i in enumerate(sample_rows) if states[i].sampling_params.logprobs is not None]
            lists = _rows_to_lists(out.logprobs, want, out.logprobs.token_ids.shape[1] - 1) \
                if want and out.logprobs is not None else []
            by_row = dict(zip(want, lists))
            for j, i in enumerate(sample_rows):
                state = states[i]
                state.output_token_ids.append(tokens[j])
                sampled[state.req_id] = [tokens[j]]
                k = state.sampling_params.logprobs
                if j in by_row:
                    ids, lps, rank = by_row[j]
                    logprobs_out[state.req_id] = [(ids[:k + 1], lps[:k + 1], rank)]
        prompt_logprobs = self._prompt_logprobs(hidden, md.query_start_loc, states, context_lens, query_lens)
        return ModelRunnerOutput(sampled, logprobs_out, prompt_logprobs)

    def _prompt_logprobs(self, hidden, query_start_loc, states, context_lens, query_lens) -> dict[str, LogprobsLists]:
        """Logprobs of the prompt tokens each chunk predicts (teacher forcing), from raw logits."""
        result: dict[str, LogprobsLists] = {}
        for i, state in enumerate(states):
            k = state.sampling_params.prompt_logprobs
            if k is None:
                continue
            n_prompt = len(state.prompt_token_ids)
            ctx, qlen = context_lens[i], query_lens[i]
            # Position p predicts prompt token p + 1; only positions before the prompt's last token.
            last = min(ctx + qlen, n_prompt - 1)
            if last <= ctx:
                result[state.req_id] = []
                continue
            start = query_start_loc[i]
            logits = self.model.compute_logits(hidden[start:start + (last - ctx)])
            targets = torch.tensor(state.prompt_token_ids[ctx + 1:last + 1], device=self.device)
            tensors = compute_logprobs_tensors(logits, targets, k)
            result[state.req_id] = _rows_to_lists(tensors, list(range(len(targets))), k)
        return result


def _rows_to_lists(t: LogprobsTensors, rows: list[int], k: int) -> LogprobsLists:
    ids = t.token_ids[rows, : k + 1].tolist()
    lps = t.logprobs[rows, : k + 1].tolist()
    ranks = t.ranks[rows].tolist()
    return [(i, l, r) for i, l, r in zip(ids, lps, ranks)]
