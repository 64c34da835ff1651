"""KV-pool sizing from a GPU memory profile, and the CUDA-graph batch sizes: pure arithmetic, no GPU."""

from __future__ import annotations

import pytest

from pagellm.worker.cuda_graphs import capture_batch_sizes, padded_batch_size
from pagellm.worker.gpu_memory import MemoryProfile, kv_cache_budget, kv_cache_num_blocks

GiB = 1 << 30
MiB = 1 << 20
# Llama-3.1-8B in bf16: 32 layers x 8 KV heads x 128 dims x (K and V) x 2 bytes = 128 KiB per token.
LLAMA8B_BLOCK = 32 * 8 * 128 * 2 * 2 * 16


def h100_profile(**overrides) -> MemoryProfile:
    values = dict(total_bytes=80 * GiB, weights_bytes=15 * GiB, peak_activation_bytes=2 * GiB,
                  graph_pool_bytes=512 * MiB, non_torch_bytes=512 * MiB)
    values.update(overrides)
    return MemoryProfile(**values)


def test_budget_is_utilization_times_total_minus_what_the_model_needs():
    profile = h100_profile()
    assert kv_cache_budget(profile, 0.9) == int(80 * GiB * 0.9) - 18 * GiB
    # 72 GiB - 18 GiB = 54 GiB of 2 MiB blocks.
    assert kv_cache_num_blocks(profile, 0.9, LLAMA8B_BLOCK, 16, 8192) == 54 * 512


def test_every_term_lowers_the_block_count():
    base = kv_cache_num_blocks(h100_profile(), 0.9, LLAMA8B_BLOCK, 16, 8192)
    for field in ("weights_bytes", "peak_activation_bytes", "graph_pool_bytes", "non_torch_bytes"):
        more = h100_profile(**{field: getattr(h100_profile(), field) + GiB})
        assert kv_cache_num_blocks(more, 0.9, LLAMA8B_BLOCK, 16, 8192) == base - 512, field
    assert kv_cache_num_blocks(h100_profile(), 0.5, LLAMA8B_BLOCK, 16, 8192) < base


def test_too_small_for_one_max_length_sequence_is_a_clear_error():
    # 131072 tokens of an 8B model need 16 GiB: 0.45 x 80 GiB - 18 GiB leaves 18 GiB, 0.4 leaves only 14 GiB.
    assert kv_cache_num_blocks(h100_profile(), 0.45, LLAMA8B_BLOCK, 16, 131072) >= 131072 // 16
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.4 .*max_model_len=131072 tokens needs 16.00 GiB"):
        kv_cache_num_blocks(h100_profile(), 0.4, LLAMA8B_BLOCK, 16, 131072)


def test_negative_budget_is_an_error_not_a_negative_pool():
    with pytest.raises(ValueError, match="leaves -"):
        kv_cache_num_blocks(h100_profile(weights_bytes=79 * GiB), 0.9, LLAMA8B_BLOCK, 16, 16)
    with pytest.raises(ValueError, match="bytes_per_block"):
        kv_cache_num_blocks(h100_profile(), 0.9, 0, 16, 16)


def test_capture_batch_sizes():
    assert capture_batch_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert capture_batch_sizes(100)[-3:] == [80, 96, 100]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(4096)[-1] == 512


def test_padded_batch_size():
    sizes = capture_batch_sizes(40)
    assert sizes == [1, 2, 4, 8, 16, 32, 40]
    assert [padded_batch_size(sizes, n) for n in (1, 3, 8, 9, 33, 40)] == [1, 4, 8, 16, 40, 40]
    assert padded_batch_size(sizes, 41) is None
