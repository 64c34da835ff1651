"""GGUF weights kept quantized: the C++ block kernels on every ISA path, the weight method, the loader,
and the real SmolLM2 Q4_1 file against HF's dequantized fp32 model."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pagellm import LLM, SamplingParams
from pagellm.layers.embedding import LMHead
from pagellm.layers.linear import Linear, MergedLinear
from pagellm.layers.quantization import GGUF_KERNEL_TYPES, GGUFLinearMethod, GGUFQuantizedTensor
from pagellm.layers.quantization.registry import plan_quantization
from pagellm.loader import iter_weights, resolve_model
from pagellm.loader.gguf import read_gguf_header
from pagellm.ops import gguf_cpu
from tests.conftest import assert_engines_near_tie, assert_top5_near_ties, isa_fixture
from tests.test_loader import tiny_model_for, write_gguf
from tests.test_smollm_parity import MAX_NEW, PROMPTS

Q = GGMLQuantizationType
TYPES = sorted((t for t in GGUF_KERNEL_TYPES if GGML_QUANT_SIZES[t][0] == 32), key=lambda t: t.value)  # K-quants: test_gguf_kquants.py
ISAS = list(gguf_cpu.ISA_NAMES)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert gguf_cpu.load_gguf_ops(), "the GGUF C++ kernels failed to build"


isa = isa_fixture(gguf_cpu)


def random_blocks(ggml_type: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random GGUF blocks: every code bit pattern, finite float16 scales (and mins)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    n_halves = 2 if ggml_type in (Q.Q4_1, Q.Q5_1) else 1  # d, and m for the types with a min
    halves = rng.uniform(-1, 1, size=(blocks.shape[0], n_halves)).astype(np.float16)
    blocks[:, : 2 * n_halves] = halves.view(np.uint8).reshape(blocks.shape[0], 2 * n_halves)
    return blocks.reshape(rows, cols // block_size * type_size)


def assert_matmul_close(out: torch.Tensor, x: torch.Tensor, w: np.ndarray) -> None:
    """float32 accumulation in any order: within a few ulp of the float64 product's magnitude."""
    w64 = torch.from_numpy(w.astype(np.float64))
    ref = x.double() @ w64.T
    bound = 1e-5 * (x.double().abs() @ w64.abs().T) + 1e-6
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(isa, ggml_type):
    blocks = random_blocks(ggml_type, 37, 256, seed=ggml_type.value)
    ref = dequantize(blocks, ggml_type).reshape(37, 256)
    ours = gguf_cpu.gguf_dequantize(torch.from_numpy(blocks), int(ggml_type), 37, 256)
    # y = q*d + m is one rounding with FMA, two without: at most an ulp apart
    torch.testing.assert_close(ours, torch.from_numpy(ref.astype(np.float32)), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 130])
def test_linear_matches_dequantize_then_matmul(isa, ggml_type, rows):
    for n, k in ((1, 32), (7, 96), (33, 256), (129, 160)):
        blocks = random_blocks(ggml_type, n, k, seed=rows * 1000 + n)
        w = dequantize(blocks, ggml_type).reshape(n, k)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
        out = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), n)
        assert out.shape == (rows, n) and out.dtype == torch.float32
        assert_matmul_close(out, x, w)


def test_linear_keeps_leading_dims_and_other_dtypes(isa):
    blocks = random_blocks(Q.Q8_0, 9, 64, seed=1)
    w = dequantize(blocks, Q.Q8_0).reshape(9, 64)
    x = torch.randn(2, 3, 64)
    out = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(Q.Q8_0), 9)
    assert out.shape == (2, 3, 9)
    assert_matmul_close(out.reshape(6, 9), x.reshape(6, 64), w)
    assert gguf_cpu.gguf_linear(x.bfloat16(), torch.from_numpy(blocks), int(Q.Q8_0), 9).dtype == torch.float32


def test_isa_switch_rejects_unknown_and_unsupported(monkeypatch):
    monkeypatch.setenv(gguf_cpu.ISA_ENV, "sse9")
    with pytest.raises(RuntimeError, match="PAGELLM_CPU_ISA=sse9"):
        gguf_cpu.active_isa()
    missing = [name for name in ISAS if name not in gguf_cpu.supported_isas()]
    for name in missing:  # nothing to try on a CPU that has every path
        monkeypatch.setenv(gguf_cpu.ISA_ENV, name)
        with pytest.raises(RuntimeError, match="does not support"):
            gguf_cpu.active_isa()
    monkeypatch.setenv(gguf_cpu.ISA_ENV, "auto")
    assert gguf_cpu.active_isa() == gguf_cpu.supported_isas()[-1]


# ---------------------------------------------------------------------------------------------
# The weight method
# ---------------------------------------------------------------------------------------------


def quantized(ggml_type: Q, rows: int, cols: int, seed: int) -> tuple[GGUFQuantizedTensor, torch.Tensor]:
    blocks = random_blocks(ggml_type, rows, cols, seed)
    dense = torch.from_numpy(dequantize(blocks, ggml_type).reshape(rows, cols).astype(np.float32))
    return GGUFQuantizedTensor(torch.from_numpy(blocks), ggml_type, torch.Size((rows, cols))), dense


def test_linear_switches_to_the_gguf_method_and_drops_the_dense_weight():
    layer = Linear(64, 11)
    q, dense = quantized(Q.Q4_1, 11, 64, seed=2)
    layer.load("weight", q)
    assert isinstance(layer.method, GGUFLinearMethod) and layer.weight is None
    assert layer.qweight.numel() == q.nbytes
    layer.prepack_for_cpu()  # quantized weights are not repacked by oneDNN
    assert isinstance(layer.method, GGUFLinearMethod)
    x = torch.randn(5, 64)
    assert_matmul_close(layer(x), x, dense.numpy())
    with pytest.raises(ValueError, match="shape"):
        Linear(64, 12).load("weight", q)


@pytest.mark.parametrize("types", [(Q.Q4_1, Q.Q4_1, Q.Q4_1), (Q.Q4_0, Q.Q8_0, Q.Q5_1), (Q.Q5_0, None, Q.Q8_0)],
                         ids=["same", "mixed", "with-dense"])
def test_merged_layer_fuses_same_type_shards_else_keeps_parts(types):
    sizes = {"q": 32, "k": 7, "v": 7}
    layer = MergedLinear(96, sizes, bias=True)
    denses = []
    for (shard, size), ggml_type in zip(sizes.items(), types):
        q, dense = quantized(ggml_type or Q.Q8_0, size, 96, seed=size)
        layer.load_shard(shard, "weight", q if ggml_type is not None else dense)
        denses.append(dense)
        layer.load_shard(shard, "bias", torch.full((size,), 0.5))
    assert isinstance(layer.method, GGUFLinearMethod) and layer.weight is None
    assert (layer.qweight is not None) == (len(set(types)) == 1)
    x = torch.randn(3, 96)
    out = layer(x)
    assert_matmul_close(out - 0.5, x, torch.cat(denses).numpy())
    assert [t.shape[-1] for t in layer.split(out)] == [32, 7, 7]


def test_dense_shard_loaded_before_the_switch_is_kept():
    layer = MergedLinear(64, {"gate": 9, "up": 9})
    q, dense_up = quantized(Q.Q4_1, 9, 64, seed=4)
    dense_gate = torch.randn(9, 64)
    layer.load_shard("gate", "weight", dense_gate)  # plain method still
    layer.load_shard("up", "weight", q)
    x = torch.randn(2, 64)
    assert_matmul_close(layer(x), x, torch.cat([dense_gate, dense_up]).numpy())


# ---------------------------------------------------------------------------------------------
# The loader and the engine, tiny random Llama quantized into several types
# ---------------------------------------------------------------------------------------------

_TINY_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q5_1, "attn_v": Q.Q8_0, "attn_output": Q.Q5_0,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "output": Q.Q4_0}


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("qgguf") / "tiny-q.gguf")
    write_gguf(path, tiny_model_for("llama"), "llama", ggml_types=_TINY_TYPES)
    return path


def test_loader_keeps_linear_weights_quantized(tiny_quantized_gguf):
    source = resolve_model(tiny_quantized_gguf)
    dense = dict(iter_weights(source, torch.float32))  # the default dequantizes, as before
    kept = dict(iter_weights(source, torch.float32, quantization="auto"))
    assert kept.keys() == dense.keys()
    for name, tensor in kept.items():
        is_linear = name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight"))
        assert isinstance(tensor, GGUFQuantizedTensor) == is_linear, name
        if is_linear:  # same values, same (un-permuted q/k) row order
            torch.testing.assert_close(tensor.dequantize(), dense[name], rtol=2e-7, atol=1e-7)
        else:
            assert torch.equal(tensor, dense[name]), name
    with pytest.raises(ValueError, match="quantization"):
        iter_weights(source, torch.float32, quantization="int3")
    # For a GPU only Q4_0 / Q4_1 / Q8_0 linear weights stay blocks (the Triton group GEMM's types);
    # the embedding and LM head kernels are CPU kernels.
    on_gpu = dict(iter_weights(source, torch.float32, quantization=plan_quantization("auto", "gguf", device="cuda")))
    gpu_types = {"Q4_0", "Q4_1", "Q8_0"}
    for name, tensor in on_gpu.items():
        kept_type = kept[name].ggml_type.name if isinstance(kept[name], GGUFQuantizedTensor) else None
        want = name.endswith("_proj.weight") and kept_type in gpu_types
        assert isinstance(tensor, GGUFQuantizedTensor) == want, name
    assert any(isinstance(t, GGUFQuantizedTensor) for t in on_gpu.values())


def test_tiny_engine_quantized_matches_dequantized(tiny_quantized_gguf):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 5 + i, 17, 30 + 2 * i]} for i in range(4)]
    runs = {}
    for mode in ("auto", "none"):
        llm = LLM(tiny_quantized_gguf, skip_tokenizer_init=True, quantization=mode, quiet=True)
        model = llm.llm_engine.core.runner.model
        methods = {type(m.method).__name__ for m in model.modules() if isinstance(m, (Linear, LMHead))}
        assert methods == ({"GGUFLinearMethod"} if mode == "auto" else {"CpuPackedLinearMethod"}), methods
        assert (model.model.embed_tokens.qweight is not None) == (mode == "auto")
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
    for q_out, d_out in zip(runs["auto"], runs["none"]):
        mine, theirs = q_out.outputs[0], d_out.outputs[0]
        assert mine.token_ids == theirs.token_ids
        for a, b in zip(mine.logprobs, theirs.logprobs):
            for token_id in set(a) & set(b):
                assert abs(a[token_id].logprob - b[token_id].logprob) < 1e-4


def test_unsupported_type_is_dequantized_with_a_warning(tmp_path, caplog):
    """Q2_K has no kernel: its weights are dequantized at load and the warning names the type."""
    import gguf

    path = str(tmp_path / "q2k.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.attention.head_count", 1)
    _, type_size = GGML_QUANT_SIZES[Q.Q2_K]
    blocks = np.random.default_rng(0).integers(0, 256, size=(4, type_size), dtype=np.uint8)
    blocks[:, -4:] = np.full((4, 2), 0.01, dtype=np.float16).view(np.uint8)  # finite d, dmin
    writer.add_tensor("blk.0.ffn_down.weight", blocks, raw_dtype=Q.Q2_K)  # (4, 256) values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with caplog.at_level("WARNING", logger="pagellm.loader.gguf"):
        weights = dict(iter_weights(resolve_model(path), torch.float32, quantization="auto"))
    assert "Q2_K" in caplog.text and "dequantized at load" in caplog.text
    (tensor,) = weights.values()
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (4, 256)
    torch.testing.assert_close(tensor, torch.from_numpy(dequantize(blocks, Q.Q2_K).reshape(4, 256)))


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 Q4_1 file, kept quantized (smollm_llm is the default load)
# ---------------------------------------------------------------------------------------------


def _quantized_layers(llm) -> list[Linear]:
    model = llm.llm_engine.core.runner.model
    return [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, GGUFLinearMethod)]


@pytest.mark.slow
def test_smollm2_greedy_quantized_matches_hf_dequantized(smollm_llm, hf_smollm_greedy):
    assert len(_quantized_layers(smollm_llm)) == 30 * 4  # qkv, o, gate_up, down in every layer
    ours = smollm_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=5), use_tqdm=False)
    assert_top5_near_ties(ours, hf_smollm_greedy)


@pytest.mark.slow
def test_smollm2_resident_weight_bytes(smollm_llm, smollm_path):
    header = read_gguf_header(smollm_path)
    kept = [t for t in header.tensors if t.ggml_type in GGUF_KERNEL_TYPES]  # linears, and the Q8_0 embedding
    assert {t.ggml_type.name for t in kept} == {"Q4_1", "Q8_0"} and any(t.name == "token_embd.weight" for t in kept)
    on_disk = sum(t.nbytes for t in kept)
    layers = _quantized_layers(smollm_llm)
    model = smollm_llm.llm_engine.core.runner.model
    embedding, head = model.model.embed_tokens, model.lm_head
    assert head.qweight is embedding.qweight  # the tied head multiplies with the embedding's blocks
    resident = sum(m.method.weight_bytes(m) for m in layers) + embedding.qweight.numel()
    assert all(m.weight is None for m in [*layers, embedding, head])  # no dense copy left behind
    assert resident <= 1.15 * on_disk, (resident, on_disk)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"quantized weights: {resident / 2**20:.1f} MiB resident vs {on_disk / 2**20:.1f} MiB on disk; "
          f"all model tensors {total / 2**20:.1f} MiB; peak RSS of this test process {rss:.0f} MiB (pid {os.getpid()})")


# ---------------------------------------------------------------------------------------------
# int8 activations (--cpu-int8-activations): x quantized per 32-value block, integer dot products
# ---------------------------------------------------------------------------------------------

INT8_ACT_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


def int8_blocks_of(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: each 32-value block scaled by amax/127 and rounded half to even."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).float().double()
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("ggml_type", INT8_ACT_TYPES, ids=lambda t: t.name)
def test_int8_activation_linear_matches_its_reference(isa, ggml_type):
    for rows in (1, 3, 8, 16):
        for n, k in ((1, 32), (7, 96), (33, 256)):
            blocks = random_blocks(ggml_type, n, k, seed=rows * 100 + n)
            w = dequantize(blocks, ggml_type).reshape(n, k)
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows * 7 + k))
            x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
            out = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), n, int8_activations=True)
            assert_matmul_close(out, int8_blocks_of(x).float(), w)
            exact = gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), n)
            assert not torch.equal(out, exact) or n == 1  # the switch really changes the arithmetic
    # Above 16 rows (prefill) the exact float path runs whatever the switch says.
    blocks = random_blocks(ggml_type, 9, 64, seed=3)
    x = torch.randn(17, 64)
    assert torch.equal(gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), 9, int8_activations=True),
                       gguf_cpu.gguf_linear(x, torch.from_numpy(blocks), int(ggml_type), 9))


HELD_TEXT = ("The river rose slowly through the night, and by morning the low fields along its banks were under "
             "water. Farmers moved their animals to the hills, while the town council met to decide whether the old "
             "bridge could still carry the weight of the trucks bringing sand for the levees.")


def _prompt_nll(llm, text: str) -> float:
    ids = llm.get_tokenizer()(text).input_ids
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    return -sum(step[tid].logprob for step, tid in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)


@pytest.mark.slow
def test_smollm2_int8_activations_near_ties_and_perplexity(smollm_llm, smollm_path):
    """int8 activations trade exactness for speed: at each prompt's first divergence from the exact
    kernels' greedy tokens, each side's token is in the other's top 5, and perplexity on a held text within 1%. A batch of 8 tokens per step keeps the
    prompt in int8-sized chunks, so the prompt's logprobs go through the int8 path too."""
    int8 = LLM(smollm_path, max_model_len=1024, kv_cache_memory=96 << 20, quiet=True, cpu_int8_activations=True,
               max_num_batched_tokens=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=5)
    got = int8.generate(PROMPTS, params, use_tqdm=False)
    ref = smollm_llm.generate(PROMPTS, params, use_tqdm=False)
    assert_engines_near_tie(got, ref, max_near_ties=len(PROMPTS))  # top-5 both ways at each first divergence
    first = [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in (got[0], ref[0])]
    assert first[0] != first[1]  # the int8 path really ran
    nll_int8, nll_exact = _prompt_nll(int8, HELD_TEXT), _prompt_nll(smollm_llm, HELD_TEXT)
    ratio = float(np.exp(nll_int8 - nll_exact))
    print(f"perplexity exact {np.exp(nll_exact):.3f}, int8 activations {np.exp(nll_int8):.3f} (ratio {ratio:.4f})")
    assert abs(ratio - 1) < 0.01 and nll_int8 != nll_exact
