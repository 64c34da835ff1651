"""Which part of a tensor a tensor-parallel rank holds (pure arithmetic, no collectives).

A dimension of `full` elements is cut into `tp_size // replicas` equal parts; `replicas`
consecutive ranks share a part. Replicas > 1 is the KV-head case: with fewer KV heads than
ranks each head is held by `tp_size // num_kv_heads` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardRange:
    start: int  # first element of this rank's part, in the full dimension
    size: int  # elements in this rank's part


def shard_range(full: int, tp_rank: int, tp_size: int, replicas: int = 1, what: str = "dimension") -> ShardRange:
    if tp_size % replicas:
        raise ValueError(f"{what}: {replicas} replicas do not divide tensor_parallel_size {tp_size}")
    parts = tp_size // replicas
    if full % parts:
        raise ValueError(f"{what} ({full}) is not divisible by {parts} tensor-parallel parts "
                         f"(tensor_parallel_size {tp_size})")
    size = full // parts
    return ShardRange((tp_rank // replicas) * size, size)


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (after replication)
    kv_replicas: int  # ranks holding each KV head (1 when the KV heads are split)


def attention_head_layout(num_heads: int, num_kv_heads: int, tp_size: int) -> HeadLayout:
    """Query heads split evenly; KV heads split, or replicated when there are fewer than ranks."""
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by tensor_parallel_size ({tp_size})")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) is not divisible by tensor_parallel_size "
                             f"({tp_size}), and tensor_parallel_size does not divide it for replication")
        return HeadLayout(num_heads // tp_size, num_kv_heads // tp_size, 1)
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp_size}) is neither a divisor nor a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    return HeadLayout(num_heads // tp_size, 1, tp_size // num_kv_heads)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of tp_size, so every rank holds as many rows."""
    return -(-vocab_size // tp_size) * tp_size


def expert_range(num_experts: int, tp_rank: int, tp_size: int) -> ShardRange:
    """Expert parallelism: the whole experts this rank holds, `num_experts // tp_size` consecutive ones."""
    if num_experts % tp_size:
        raise ValueError(f"enable_expert_parallel: num_local_experts ({num_experts}) is not divisible by "
                         f"tensor_parallel_size ({tp_size})")
    size = num_experts // tp_size
    return ShardRange(tp_rank * size, size)
