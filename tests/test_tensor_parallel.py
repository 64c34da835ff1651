"""Tensor parallelism on the CPU with gloo: each rank is a spawned process holding only its
shard; the split linears, the vocab-parallel embedding / LM head and whole tiny models give
what one process gives (fp32, within summation-order noise), and bad layouts name the numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from pagellm.distributed.layout import HeadLayout, attention_head_layout, padded_vocab_size
from pagellm.distributed.parallel_state import ParallelContext, get_parallel_context, init_parallel, set_parallel_context
from pagellm.layers.linear import Linear, MergedLinear, ParallelStyle
from pagellm.models.llama import LlamaForCausalLM
from tests.conftest import make_tiny_llama
from tests.test_gemma3 import make_tiny_gemma3
from tests.test_models import make_tiny
from tests.tp_ranks import layers_case, model_case, run_ranks

TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-models")
    # Untied, biased q/k/v/o (the row-parallel bias), one KV head (replicated), vocab 509 (padded to 510).
    odd = make_tiny_llama(str(root / "llama-odd"), seed=5, tie=False, num_kv_heads=1, vocab_size=509, bias=True)
    paths = {name: make_tiny(str(root / name), name)[0] for name in ("qwen3", "phi3_longrope_short", "mixtral")}
    gemma3 = make_tiny_gemma3(str(root / "gemma3"))
    return {"llama": tiny_llama, "llama_odd": odd, "gemma3": gemma3, **paths}


def _assert_model_matches(name: str, reference: dict, ranks: list[dict], kv_heads: int) -> None:
    for rank, got in enumerate(ranks):
        for key in ("prefill", "decode"):
            torch.testing.assert_close(got[key], reference[key], **TOL, msg=lambda m: f"{name} rank {rank} {key}: {m}")
            assert torch.equal(got[key].argmax(-1), reference[key].argmax(-1)), f"{name} rank {rank} {key} argmax"
        assert got["kv_heads"] == kv_heads, f"{name} rank {rank} caches {got['kv_heads']} KV heads"


def test_layers_and_models_at_tp2_equal_one_process(tmp_path, checkpoints):
    # Phi-3 stores qkv and gate_up fused (cut projection by projection); Mixtral's experts are split.
    names = ["llama", "llama_odd", "qwen3", "gemma3", "phi3_longrope_short", "mixtral"]
    cases = [("layers", ())] + [("model", (checkpoints[n],)) for n in names]
    ranks = run_ranks(tmp_path, 2, cases + [("model_ep", (checkpoints["mixtral"],))])
    ref_layers = layers_case()
    for rank, (layers, *_) in enumerate(ranks):
        for key in ("column", "row", "embed", "tied_head", "untied_head"):
            torch.testing.assert_close(layers[key], ref_layers[key], **TOL, msg=lambda m: f"rank {rank} {key}: {m}")
        assert layers.keys() == ref_layers.keys()
        assert layers["broadcast"] == {"from": 0, "ids": [1, 2]}
        if "row_packed" in layers:
            torch.testing.assert_close(layers["row_packed"], ref_layers["row"], **TOL)
        assert torch.equal(layers["embed"], ref_layers["embed"])  # a lookup plus zeros: exact
        for mode in ("shards", "fused"):
            for got, want in zip(layers[f"qkv_{mode}"], ref_layers["qkv_shards"]):
                torch.testing.assert_close(got, want, **TOL)
    # KV heads per rank at tp 2: llama_odd has 1 (replicated), the others 2 (split).
    for i, name in enumerate(names):
        _assert_model_matches(name, model_case(checkpoints[name]), [r[1 + i] for r in ranks], kv_heads=1)
    # Each rank holds (and read from the checkpoint) about half the weights; replicated: norms, the router.
    fulls = {name: model_case(checkpoints[name])["weight_bytes"] for name in names}
    for i, name in enumerate(names):
        for r in ranks:
            assert fulls[name] / 2 <= r[1 + i]["weight_bytes"] <= 0.55 * fulls[name], (name, r[1 + i]["weight_bytes"])
    # Expert parallel: 2 of the 4 tiny Mixtral experts per rank, each whole (gate | up rows: 2 x 96).
    ep = [r[-1] for r in ranks]
    _assert_model_matches("mixtral-ep", model_case(checkpoints["mixtral"]), ep, kv_heads=1)
    assert [r["experts"][:2] for r in ep] == [(0, 2), (2, 2)]
    assert {r["experts"][2][:2] for r in ep} == {(2, 2 * 96)}
    assert all(r["weight_bytes"] <= 0.55 * fulls["mixtral"] for r in ep)


def test_models_at_tp4_replicate_kv_heads(tmp_path, checkpoints):
    names = ["llama", "gemma3"]  # 4 heads, 2 KV heads: one head per rank, each KV head on 2 ranks
    ranks = run_ranks(tmp_path, 4, [("model", (checkpoints[n],)) for n in names])
    for i, name in enumerate(names):
        _assert_model_matches(name, model_case(checkpoints[name]), [r[i] for r in ranks], kv_heads=1)


def _fake_rank(rank: int, size: int) -> ParallelContext:
    """A context for building layers without collectives (shapes and layouts only)."""
    return ParallelContext(tp_rank=rank, tp_size=size, tp_group=object())


def test_kv_heads_are_replicated_to_the_ranks_that_need_them():
    # 2 KV heads of dim 4 at tp 4: ranks 0, 1 hold head 0; ranks 2, 3 head 1. q: one head each.
    starts = []
    for rank in range(4):
        qkv = MergedLinear(8, {"q": 16, "k": 8, "v": 8}, parallel_style=ParallelStyle.COLUMN,
                           parallel=_fake_rank(rank, 4), shard_replicas={"k": 2, "v": 2})
        starts.append(tuple(qkv.shard_parts[s][1].start for s in ("q", "k", "v")))
        assert qkv.weight.shape == (12, 8) and list(qkv.shard_offsets.values()) == [(0, 4), (4, 4), (8, 4)]
    assert starts == [(0, 0, 0), (4, 0, 0), (8, 4, 4), (12, 4, 4)]
    assert attention_head_layout(9, 3, 3) == HeadLayout(3, 1, 1)  # SmolLM2 at tp 3: one KV head each
    assert attention_head_layout(4, 1, 2) == HeadLayout(2, 1, 2)  # Gemma 3 270M at tp 2: the KV head on both
    assert padded_vocab_size(51, 2) == 52 and padded_vocab_size(512, 4) == 512
    row = Linear(12, 10, bias=True, parallel_style=ParallelStyle.ROW, parallel=_fake_rank(1, 3))
    assert row.weight.shape == (10, 4) and row.bias.shape == (10,)
    with pytest.raises(ValueError, match=r"expected 12 along dim 1"):
        row.load("weight", torch.zeros(10, 4))  # a pre-split tensor is not a checkpoint tensor


def _config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("overrides,tp,message", [
    (dict(), 3, r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"),
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 2,
     r"num_key_value_heads \(3\) is not divisible by tensor_parallel_size \(2\)"),
    (dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=48), 6,
     r"tensor_parallel_size \(6\) is neither a divisor nor a multiple of num_key_value_heads \(4\)"),
    (dict(intermediate_size=66), 4, r"intermediate_size \(66\) is not divisible by tensor_parallel_size \(4\)"),
])
def test_bad_layouts_name_the_numbers(overrides, tp, message):
    with set_parallel_context(_fake_rank(0, tp)), pytest.raises(ValueError, match=message):
        LlamaForCausalLM(_config(**overrides), 64)


def test_single_process_context_is_the_default_and_needs_no_group():
    assert get_parallel_context() == ParallelContext()
    with pytest.raises(ValueError, match="tp_size 2 needs a tp_group"):
        ParallelContext(tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="world_size 6 is not tensor_parallel_size 4 x pipeline_parallel_size 1"):
        init_parallel(6, 0, 4)
    assert not Linear(4, 3, parallel_style=ParallelStyle.ROW).reduces_output


def _moe_config(**overrides):
    from transformers import MixtralConfig
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    return MixtralConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("config,tp,kwargs,message", [
    (_config(), 3, {}, r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"),
    (_config(intermediate_size=66), 4, {}, r"intermediate_size \(66\) is not divisible by tensor_parallel_size \(4\)"),
    (_config(), 4, dict(device="cuda", cuda_device_count=2),
     r"tensor_parallel_size \(4\) x pipeline_parallel_size \(1\) = 4 ranks is more than the 2 CUDA devices"),
    (_moe_config(), 4, dict(expert_parallel=True),
     r"enable_expert_parallel: num_local_experts \(6\) is not divisible by tensor_parallel_size \(4\)"),
])
def test_layout_checked_before_any_rank_starts(config, tp, kwargs, message):
    from pagellm.distributed.startup_checks import check_parallel_layout
    with pytest.raises(ValueError, match=message):
        check_parallel_layout(config, tp, **kwargs)


def test_expert_parallel_applies_to_moe_models_only(caplog):
    from pagellm.distributed.startup_checks import check_parallel_layout
    # 6 experts over 2 ranks; intermediate 51 is not split under expert parallelism, so it need not divide.
    assert check_parallel_layout(_moe_config(intermediate_size=51), 2, expert_parallel=True)
    with pytest.raises(ValueError, match=r"intermediate_size \(51\)"):
        check_parallel_layout(_moe_config(intermediate_size=51), 2)
    assert check_parallel_layout(_config(vocab_size=61), 4) is False  # the vocabulary is padded: any size
    with caplog.at_level("WARNING"):
        assert check_parallel_layout(_config(), 2, expert_parallel=True) is False
    assert "enable_expert_parallel is ignored" in caplog.text


def test_gguf_blocks_split_on_block_boundaries_else_dequantize(caplog):
    import gguf
    import numpy as np

    from pagellm.layers.quantization.gguf import GGUFQuantizedTensor
    from pagellm.ops.gguf_cpu import load_gguf_ops
    assert load_gguf_ops(), "the GGUF CPU kernels did not build"
    weight = torch.randn(6, 128, generator=torch.Generator().manual_seed(20)).numpy().astype(np.float32)
    qtype = gguf.GGMLQuantizationType.Q8_0
    blocks = torch.from_numpy(gguf.quants.quantize(weight, qtype).copy())
    tensor = GGUFQuantizedTensor(blocks, qtype, torch.Size((6, 128)))
    full = tensor.dequantize()
    rows = tensor.narrow(0, 2, 3)  # column-parallel: whole ggml rows
    assert isinstance(rows, GGUFQuantizedTensor) and torch.equal(rows.dequantize(), full[2:5])
    cols = tensor.narrow(1, 64, 64)  # row-parallel at tp 2: two 32-value blocks per row
    assert isinstance(cols, GGUFQuantizedTensor) and torch.equal(cols.dequantize(), full[:, 64:])
    with caplog.at_level("WARNING"):
        odd = tensor.narrow(1, 48, 40)  # not on a block boundary: dequantized, then cut
    assert not isinstance(odd, GGUFQuantizedTensor) and torch.equal(odd, full[:, 48:88])
    assert "do not fall on 32-value block boundaries" in caplog.text
    # A row-parallel layer on rank 1 of 2 keeps its columns quantized and computes what the dense part does.
    row = Linear(128, 6, parallel_style=ParallelStyle.ROW, parallel=_fake_rank(1, 2))
    row.load("weight", tensor)
    assert row.qweight is not None and row.qweight.shape == cols.data.shape
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(row.method.apply(row, x), x @ full[:, 64:].T, atol=1e-4, rtol=1e-4)


def test_lazy_safetensors_reads_only_the_rank_part(tmp_path):
    from safetensors.torch import save_file

    from pagellm.loader.hf import iter_safetensors_weights
    from pagellm.loader.lazy import LazyTensor
    full = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    (name, lazy), = iter_safetensors_weights(str(tmp_path), torch.float32, lazy=True)
    assert isinstance(lazy, LazyTensor) and lazy.shape == (6, 10) and lazy.dim() == 2
    assert torch.equal(lazy.narrow(1, 5, 5), full[:, 5:].float()) and lazy.narrow(0, 2, 2).dtype == torch.float32
    row = Linear(10, 6, parallel_style=ParallelStyle.ROW, parallel=_fake_rank(1, 2))
    column = Linear(10, 6, parallel_style=ParallelStyle.COLUMN, parallel=_fake_rank(1, 2))
    row.load("weight", lazy)
    column.load("weight", lazy)
    assert torch.equal(row.weight, full[:, 5:].float()) and torch.equal(column.weight, full[3:].float())
