"""The KV cache of one worker: bytes per token, how many blocks fit, the tensors, the start-up line.

Sizing: on the CPU the pool is `kv_cache_memory` bytes; on CUDA it is what a start-up profile
leaves of `gpu_memory_utilization x total` (`gpu_memory.py` holds that arithmetic). The check that
the pool holds one max-length request is made once, by the executor, on the block count every
worker can hold (`check_kv_capacity`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from pagellm.attention.backend import AttentionBackend
from pagellm.attention.kv_quant import INT8_SCALE_DTYPE, KVCacheFormat, KVQuant
from pagellm.attention.layer import Attention
from pagellm.config import EngineConfig
from pagellm.worker.gpu_memory import MemoryProfile, kv_cache_num_blocks

logger = logging.getLogger(__name__)


def kv_bytes_per_token(model_config, dtype: torch.dtype, kv_format: KVCacheFormat | None = None) -> int:
    """K+V bytes of one token over all layers, quantization scales included (`kv_format`: the
    cache's storage; None: the model dtype)."""
    kv_format = kv_format or KVCacheFormat("auto", dtype)
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return 2 * model_config.num_hidden_layers * num_kv_heads * kv_format.bytes_per_head_token(head_dim)


def model_kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype, kv_format: KVCacheFormat | None = None) -> int:
    """KV bytes per token of a built model: its Attention layers' own (per-rank) KV heads."""
    kv_format = kv_format or KVCacheFormat("auto", dtype)
    return sum(2 * layer.num_kv_heads * kv_format.bytes_per_head_token(layer.head_dim) for layer in model.modules()
               if isinstance(layer, Attention))


def blocks_from_budget(budget: int, bytes_per_block: int) -> int:
    """Blocks in a fixed byte budget (the CPU's `kv_cache_memory`)."""
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) is smaller than one block ({bytes_per_block} bytes); "
                         "raise kv_cache_memory / gpu_memory_utilization")
    return int(num_blocks)


def blocks_from_profile(profile: MemoryProfile, config: EngineConfig, bytes_per_block: int) -> int:
    num_blocks = kv_cache_num_blocks(profile, config.gpu_memory_utilization, bytes_per_block, config.block_size,
                                     config.max_model_len)
    logger.info("GPU memory profile: %s -> %d KV blocks (%d tokens)", profile.describe(), num_blocks,
                num_blocks * config.block_size)
    return num_blocks


def profile_cuda_memory(device: torch.device, config: EngineConfig, profile_run: Callable[[int, int], int],
                        graph_batch: int) -> MemoryProfile:
    """Weights, the activation peak at max_num_batched_tokens, a graph-pool estimate, memory outside torch.

    `profile_run(num_tokens, num_reqs)` runs one dummy step and returns the bytes of the temporary
    KV cache it used; `graph_batch` is the largest CUDA-graph batch (0 without graphs).
    """
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    tokens = config.max_num_batched_tokens
    num_reqs = max(min(config.max_num_seqs, tokens), -(-tokens // config.max_model_len))
    peak = _peak_bytes(device, lambda: profile_run(tokens, num_reqs), weights)
    graph_pool = 0
    if graph_batch:
        # The graphs share one pool, about one decode step's activations at the largest batch.
        graph_pool = _peak_bytes(device, lambda: profile_run(graph_batch, graph_batch), weights)
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(total - free - torch.cuda.memory_reserved(device), 0)
    return MemoryProfile(total, weights, peak, graph_pool, non_torch)


def _peak_bytes(device: torch.device, run: Callable[[], int], baseline: int) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    kv_bytes = run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline - kv_bytes
    torch.cuda.empty_cache()
    return max(peak, 0)


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """Tokens the pool holds; a ValueError when one max_model_len request could not fit."""
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        raise ValueError(
            f"the KV cache holds {capacity} tokens, less than max_model_len ({max_model_len}), "
            "so one long request could never finish; raise kv_cache_memory / gpu_memory_utilization "
            "or lower max_model_len")
    return capacity


def kv_cache_summary(num_blocks: int, block_size: int, max_model_len: int, bytes_per_token: int,
                     storage: str = "", model_dtype_bytes_per_token: int = 0) -> str:
    """The start-up line: pool size, bytes per token, storage (with a quantized cache, its token
    gain over the model dtype), and how many max-length requests fit."""
    capacity = num_blocks * block_size
    if storage and model_dtype_bytes_per_token:
        storage = f"{storage}, {model_dtype_bytes_per_token / bytes_per_token:.2f}x the tokens of the model dtype"
    return (f"KV cache: {num_blocks} blocks x {block_size} tokens = {capacity} tokens "
            f"({bytes_per_token} bytes/token, {capacity * bytes_per_token / 2**20:.1f} MiB"
            f"{'; ' + storage if storage else ''}); "
            f"max concurrency at {max_model_len} tokens/request: {capacity / max_model_len:.2f}x")


def allocate_kv_cache(model: torch.nn.Module, backend: AttentionBackend, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device,
                      kv_format: KVCacheFormat | None = None) -> list[torch.Tensor]:
    """One zeroed cache tensor per attention layer, bound to that layer (with the backend); an
    int8 cache also gets its scale tensor. Returns every tensor allocated."""
    kv_format = kv_format or KVCacheFormat("auto", dtype)
    caches = []
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = backend.kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            cache = torch.zeros(shape, dtype=kv_format.storage_dtype, device=device)
            layer.kv_cache = cache
            layer.backend = backend
            layer.kv_quant = None
            caches.append(cache)
            if kv_format.kind == "fp8":
                layer.kv_quant = KVQuant("fp8", k_scale=layer.k_scale, v_scale=layer.v_scale)
            elif kv_format.kind == "int8":
                scales = torch.zeros((2, num_blocks, block_size, layer.num_kv_heads), dtype=INT8_SCALE_DTYPE,
                                     device=device)
                layer.kv_quant = KVQuant("int8", scales=scales)
                caches.append(scales)
    return caches


def release_kv_cache(model: torch.nn.Module) -> None:
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.kv_cache = None
            layer.kv_quant = None
