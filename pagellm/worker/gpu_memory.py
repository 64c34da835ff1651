"""How many KV blocks fit on the GPU, from a profile taken at start-up.

The runner measures what the model needs besides the KV cache (weights, the activation peak of
one forward at the largest batch, a CUDA-graph pool estimate, memory outside torch such as the
CUDA context) and the KV pool gets the rest of `gpu_memory_utilization x total`. The arithmetic
is a pure function so it can be checked without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = float(1 << 30)


@dataclass(frozen=True)
class MemoryProfile:
    total_bytes: int  # the device's memory
    weights_bytes: int  # torch allocations after loading (weights, rope tables)
    peak_activation_bytes: int  # peak of a dummy forward + sampling at max_num_batched_tokens, KV excluded
    graph_pool_bytes: int  # estimate of the CUDA-graph memory pool (0 with enforce_eager)
    non_torch_bytes: int = 0  # used outside torch's allocator: CUDA context, library handles

    def describe(self) -> str:
        return (f"total {self.total_bytes / GiB:.2f} GiB, weights {self.weights_bytes / GiB:.2f} GiB, "
                f"peak activations {self.peak_activation_bytes / GiB:.2f} GiB, "
                f"CUDA graphs {self.graph_pool_bytes / GiB:.2f} GiB, other {self.non_torch_bytes / GiB:.2f} GiB")


def kv_cache_budget(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes left for the KV pool: utilization x total - (weights + activations + graphs + other)."""
    used = profile.weights_bytes + profile.peak_activation_bytes + profile.graph_pool_bytes + profile.non_torch_bytes
    return int(profile.total_bytes * gpu_memory_utilization) - used


def kv_cache_num_blocks(profile: MemoryProfile, gpu_memory_utilization: float, bytes_per_block: int,
                        block_size: int, max_model_len: int) -> int:
    """Blocks the budget holds; a ValueError naming the numbers when not even one max-length sequence fits."""
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be positive, got {bytes_per_block}")
    budget = kv_cache_budget(profile, gpu_memory_utilization)
    num_blocks = max(budget, 0) // bytes_per_block
    if num_blocks * block_size < max_model_len:
        needed = -(-max_model_len // block_size) * bytes_per_block
        raise ValueError(
            f"gpu_memory_utilization={gpu_memory_utilization} leaves {budget / GiB:.2f} GiB for the KV cache "
            f"({num_blocks} blocks = {num_blocks * block_size} tokens), but one sequence of max_model_len="
            f"{max_model_len} tokens needs {needed / GiB:.2f} GiB ({profile.describe()}); raise "
            "gpu_memory_utilization, lower max_model_len or max_num_batched_tokens, or pass enforce_eager")
    return int(num_blocks)
