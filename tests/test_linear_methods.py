"""The weight-method seam of the linear layers: plain vs oneDNN-prepacked weights, merged shards,
parallel style and the checkpoint-shard hook."""

from __future__ import annotations

import pytest
import torch

from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import (
    CpuPackedLinearMethod,
    Linear,
    MergedLinear,
    ParallelStyle,
    UnquantizedLinearMethod,
    cpu_prepack_available,
    prepack_cpu_weights,
)
from pagellm.utils import cdiv, head_dim

TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _random_(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_and_prepacked_agree_over_ragged_row_counts(dtype):
    if not cpu_prepack_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU/torch build")
    layer = Linear(80, 136, bias=True)
    _random_(layer)
    layer = layer.to(dtype)
    assert isinstance(layer.method, UnquantizedLinearMethod)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(rows, 80, generator=gen).to(dtype) for rows in (1, 3, 7, 16, 63, 64, 65, 130)]
    expected = [layer(x) for x in inputs]
    assert prepack_cpu_weights(layer) == 1
    assert isinstance(layer.method, CpuPackedLinearMethod)
    assert layer.packed is not None and layer.weight is None
    for x, want in zip(inputs, expected):
        torch.testing.assert_close(layer(x), want, **TOLERANCE[dtype])


def test_loading_after_prepack_raises():
    if not cpu_prepack_available(torch.float32):
        pytest.skip("oneDNN cannot pack float32 here")
    merged = MergedLinear(16, {"gate": 8, "up": 8})
    _random_(merged)
    merged.prepack_for_cpu()
    with pytest.raises(RuntimeError, match="after prepack_for_cpu"):
        merged.load_shard("gate", "weight", torch.zeros(8, 16))
    with pytest.raises(RuntimeError, match="after prepack_for_cpu"):
        merged.load("weight", torch.zeros(16, 16))


def test_merged_shards_load_into_their_rows():
    merged = MergedLinear(6, {"q": 4, "k": 2, "v": 2}, bias=True)
    parts = {s: (torch.full((n, 6), float(i + 1)), torch.full((n,), -float(i + 1)))
             for i, (s, n) in enumerate({"q": 4, "k": 2, "v": 2}.items())}
    for shard, (w, b) in parts.items():
        merged.load_shard(shard, "weight", w)
        merged.load_shard(shard, "bias", b)
    torch.testing.assert_close(merged.weight.data, torch.cat([w for w, _ in parts.values()]))
    torch.testing.assert_close(merged.bias.data, torch.cat([b for _, b in parts.values()]))
    q, k, v = merged.split(merged(torch.ones(3, 6)))
    assert (q.shape, k.shape, v.shape) == ((3, 4), (3, 2), (3, 2))
    torch.testing.assert_close(k, torch.full((3, 2), 2 * 6 - 2.0))
    with pytest.raises(ValueError, match="shard k.weight has shape"):
        merged.load_shard("k", "weight", torch.zeros(3, 6))
    with pytest.raises(ValueError, match="unexpected bias"):
        MergedLinear(6, {"a": 2}).load_shard("a", "bias", torch.zeros(2))


def test_whole_load_checks_shape():
    layer = Linear(4, 3)
    layer.load("weight", torch.eye(3, 4))
    torch.testing.assert_close(layer(torch.ones(1, 4)), torch.ones(1, 3))
    with pytest.raises(ValueError, match="weight weight has shape"):
        layer.load("weight", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="weight bias has shape"):
        layer.load("bias", torch.zeros(3))  # built without a bias


def test_parallel_style_is_replicated_and_checkpoint_shard_is_identity():
    layer, merged = Linear(4, 3), MergedLinear(4, {"a": 1, "b": 2})
    assert layer.parallel_style is ParallelStyle.REPLICATED and merged.parallel_style is ParallelStyle.REPLICATED
    tensor = torch.randn(3, 4)
    assert layer.checkpoint_shard("weight", tensor) is tensor
    assert merged.checkpoint_shard("weight", tensor[:1], "a").data_ptr() == tensor.data_ptr()
    # Without a tensor-parallel context (tp_size 1) split layers hold and load the whole tensor.
    for style in (ParallelStyle.COLUMN, ParallelStyle.ROW):
        split = Linear(4, 3, parallel_style=style)
        assert split.weight.shape == (3, 4) and split.checkpoint_shard("weight", tensor) is tensor


def test_plain_method_keeps_parameters_and_post_load_step_is_a_no_op():
    layer = Linear(4, 3, bias=True)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    weight = layer.weight
    layer.process_after_loading()
    assert layer.weight is weight and layer.packed is None


def test_tied_lm_head_packs_but_keeps_the_embedding_weight():
    if not cpu_prepack_available(torch.float32):
        pytest.skip("oneDNN cannot pack float32 here")
    embed = VocabEmbedding(50, 16)
    head, untied = LMHead(50, 16, tied_to=embed), LMHead(50, 16)
    _random_(embed)
    _random_(untied, seed=3)
    x = torch.randn(5, 16)
    expected = head(x), untied(x)
    head.prepack_for_cpu()
    untied.prepack_for_cpu()
    assert head.weight is embed.weight and untied.weight is None
    torch.testing.assert_close(head(x), expected[0], **TOLERANCE[torch.float32])
    torch.testing.assert_close(untied(x), expected[1], **TOLERANCE[torch.float32])
    assert head(x).dtype == torch.float32


def test_utils():
    assert [cdiv(a, 16) for a in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]

    class Config:
        hidden_size, num_attention_heads = 640, 4

    assert head_dim(Config()) == 160
    Config.head_dim = 256
    assert head_dim(Config()) == 256
