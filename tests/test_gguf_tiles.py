"""GGUF Q4_0/Q4_1/Q8_0 weights in 16-row tiles (csrc/gguf_tiled_ops.cpp): the repack, both products
(float32 and int8 activations) on every ISA path against their references, the weight method, and
the engine with tiles on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from pagellm import LLM, SamplingParams
from pagellm.layers.embedding import LMHead
from pagellm.layers.linear import Linear, MergedLinear
from pagellm.layers.quantization import GGUFLinearMethod
from pagellm.ops import gguf_cpu
from tests.test_quantized_weights import (Q, assert_matmul_close, int8_blocks_of, isa, kernels,  # noqa: F401
                                          quantized, random_blocks, tiny_quantized_gguf)

TILED = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
SHAPES = [(1, 32), (15, 64), (16, 96), (17, 32), (33, 256), (100, 576)]  # rows not a multiple of 16 pad a tile


def _tiles(blocks: np.ndarray, ggml_type: Q, n: int, k: int) -> torch.Tensor:
    return gguf_cpu.gguf_tiled_repack(torch.from_numpy(blocks), int(ggml_type), n, k)


@pytest.mark.parametrize("ggml_type", TILED, ids=lambda t: t.name)
def test_repack_keeps_every_value_and_the_byte_count(ggml_type):
    for n, k in SHAPES:
        blocks = random_blocks(ggml_type, n, k, seed=n * 31 + k)
        tiles = _tiles(blocks, ggml_type, n, k)
        assert tiles.numel() == -(-n // 16) * 16 * blocks.shape[1]  # the same bytes, rows padded to 16
        got = gguf_cpu.gguf_tiled_dequantize(tiles, int(ggml_type), n, k)
        want = torch.from_numpy(dequantize(blocks, ggml_type).reshape(n, k).astype(np.float32))
        assert torch.equal(got, want), (n, k)


@pytest.mark.parametrize("ggml_type", TILED, ids=lambda t: t.name)
def test_float_activations_match_dequantize_then_matmul(isa, ggml_type):
    """1-16 rows run on the tiles (in groups of up to 4 rows), more expand slabs of W^T for
    at::mm; both float32-accurate."""
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 40):  # groups of 4 rows and their remainders
        for n, k in SHAPES[::2] if rows > 4 else SHAPES:
            blocks = random_blocks(ggml_type, n, k, seed=rows * 1000 + n)
            w = dequantize(blocks, ggml_type).reshape(n, k)
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
            out = gguf_cpu.gguf_tiled_linear(x, _tiles(blocks, ggml_type, n, k), int(ggml_type), n)
            assert out.shape == (rows, n)
            assert_matmul_close(out, x, w)


@pytest.mark.parametrize("ggml_type", TILED, ids=lambda t: t.name)
def test_int8_activations_match_their_reference_at_every_row_count(isa, ggml_type):
    """Integer sums are exact, so the result is the product with x's int8 blocks (the row kernel's
    quantization, bit for bit) to float32 accuracy, for decode and prefill sizes alike."""
    for rows in (1, 3, 4, 7, 16, 17, 33):
        for n, k in SHAPES[1::2]:
            blocks = random_blocks(ggml_type, n, k, seed=rows * 100 + n)
            w = dequantize(blocks, ggml_type).reshape(n, k)
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows * 7 + k))
            if k > 32:
                x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
            tiles = _tiles(blocks, ggml_type, n, k)
            out = gguf_cpu.gguf_tiled_linear(x, tiles, int(ggml_type), n, int8_activations=True)
            assert_matmul_close(out, int8_blocks_of(x).float(), w)
            assert not torch.equal(out, gguf_cpu.gguf_tiled_linear(x, tiles, int(ggml_type), n))
            if rows <= 16:  # the row-layout int8 kernel quantizes x the same way: the same reference
                row = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), n, int8_activations=True)
                assert_matmul_close(row, int8_blocks_of(x).float(), w)


def test_leading_dims_and_bad_input():
    blocks = random_blocks(Q.Q4_1, 20, 64, seed=1)
    tiles = _tiles(blocks, Q.Q4_1, 20, 64)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    out = gguf_cpu.gguf_tiled_linear(x, tiles, int(Q.Q4_1), 20)
    assert out.shape == (2, 3, 20) and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match="no tiled layout"):
        gguf_cpu.gguf_tiled_repack(torch.from_numpy(random_blocks(Q.Q5_0, 4, 32, seed=0)), int(Q.Q5_0), 4, 32)
    with pytest.raises(RuntimeError, match="expected"):
        gguf_cpu.gguf_tiled_linear(torch.randn(1, 64), tiles[:-1], int(Q.Q4_1), 20)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        gguf_cpu.gguf_tiled_linear(torch.randn(1, 48), tiles, int(Q.Q4_1), 20)


def test_layer_switches_to_tiles_and_keeps_its_output():
    layer = MergedLinear(96, {"gate": 40, "up": 40})
    denses = []
    for shard in ("gate", "up"):
        q, dense = quantized(Q.Q4_1, 40, 96, seed=len(denses))
        layer.load_shard(shard, "weight", q)
        denses.append(dense)
    x = torch.randn(3, 96)
    before, nbytes = layer(x), layer.method.weight_bytes(layer)
    assert layer.method.use_tiles(layer) and layer.method.tiled
    assert layer.method.weight_bytes(layer) == nbytes  # 80 rows are 5 whole tiles: no padding
    assert_matmul_close(layer(x), x, torch.cat(denses).numpy())
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert layer.method.use_tiles(layer)  # twice is a no-op
    other = Linear(64, 9)
    other.load("weight", quantized(Q.Q5_1, 9, 64, seed=3)[0])
    assert not other.method.use_tiles(other)  # no tiled layout for Q5_1: rows stay as they are


def test_tiny_engine_tiles_on_and_off_give_the_same_tokens(tiny_quantized_gguf):
    """The tiny model mixes tiled types (gate/up Q4_1, down Q8_0, untied head Q4_0) with row-layout
    ones (q/k/v of three types, o Q5_0); exact kernels both ways: same greedy tokens, same logprobs."""
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 5 + i, 17, 30 + 2 * i] * (1 + 6 * i)} for i in range(4)]  # decode and prefill
    runs, tiled_counts = {}, {}
    for tiles in (True, False):
        llm = LLM(tiny_quantized_gguf, skip_tokenizer_init=True, cpu_gguf_tiles=tiles, quiet=True)
        model = llm.llm_engine.core.runner.model
        methods = [m.method for m in model.modules() if isinstance(m, (Linear, LMHead))
                   and isinstance(m.method, GGUFLinearMethod)]
        tiled_counts[tiles] = sum(m.tiled for m in methods)
        runs[tiles] = llm.generate(prompts, params, use_tqdm=False)
    n_layers = 2  # tiny_model_for("llama")
    assert tiled_counts == {True: 2 * n_layers + 1, False: 0}  # gate_up, down per layer, and the head
    for on, off in zip(runs[True], runs[False]):
        assert on.outputs[0].token_ids == off.outputs[0].token_ids
        for a, b in zip(on.outputs[0].logprobs, off.outputs[0].logprobs):
            for token_id in set(a) & set(b):
                assert abs(a[token_id].logprob - b[token_id].logprob) < 1e-4
