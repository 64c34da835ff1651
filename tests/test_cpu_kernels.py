"""The CPU fast paths against their torch references, and each one's on/off switch in the engine.

- C++ paged decode attention (`attention_backend="cpu"`) vs the torch backend: ragged contexts,
  random block tables, GQA 1/3/4/8, head sizes 64/128/256 (and an odd 40), block sizes 16/32,
  sliding window, softcap, fp32/bf16/fp16, batches big and small (the kernel splits small ones by
  head), and steps that mix decodes with prompt chunks.
- C++ RMSNorm / fused residual-add RMSNorm / SiLU-and-mul vs the torch expressions.
- Each kernel test runs on every ISA path the CPU has (scalar, AVX2, AVX-512), forced with
  PAGELLM_CPU_ISA through the real run-time dispatch.
- oneDNN-prepacked linear layers vs F.linear.
- Engine: greedy tokens identical with every fast path off and on, on the real SmolLM2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm.attention import selector
from pagellm.attention.backend import build_metadata
from pagellm.attention import cpu_backend
from pagellm.attention.cpu_backend import CpuAttentionBackend
from pagellm.attention.torch_backend import TorchAttentionBackend
from pagellm.layers.activation import SiluAndMul
from pagellm.layers.embedding import LMHead, VocabEmbedding
from pagellm.layers.linear import Linear, MergedLinear, cpu_prepack_available, prepack_cpu_weights
from pagellm.layers.norm import RMSNorm
from pagellm.ops import cpu as cpu_ops
from pagellm.ops.cpu import enable_cpu_kernels, load_cpu_ops
from tests.conftest import isa_fixture


@pytest.fixture(autouse=True)
def cpu_ops_built():
    # The kernels are built with the machine's compiler; `make test` machines have one, and a build
    # failure must fail these tests rather than quietly test the torch fallback against itself.
    assert load_cpu_ops(), "the C++ CPU kernels failed to build (see the warning logged above)"

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=1.5e-2, rtol=1e-2),
             torch.float16: dict(atol=2e-3, rtol=2e-3)}


isa = isa_fixture(cpu_ops)


def _paged_batch(gen, query_lens, context_lens, block_size, hq, hkv, d, dtype):
    num_blocks = sum(-(-(c + q) // block_size) for c, q in zip(context_lens, query_lens)) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_ids, used = [], 0
    for c, q in zip(context_lens, query_lens):
        n = -(-(c + q) // block_size)
        block_ids.append(order[used:used + n])
        used += n
    md = build_metadata(query_lens, context_lens, block_ids, block_size, torch.device("cpu"))
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, cache, md


def _compare(q, k, v, cache, md, window, softcap, dtype):
    scale = q.shape[-1] ** -0.5
    ref_cache, cpu_cache = cache.clone(), cache.clone()
    expected = TorchAttentionBackend().forward(q, k, v, ref_cache, md, scale, window, softcap)
    got = CpuAttentionBackend().forward(q, k, v, cpu_cache, md, scale, window, softcap)
    assert torch.equal(cpu_cache, ref_cache)  # the same cache writes
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


RAGGED_CONTEXTS = [0, 4, 15, 16, 17, 63, 130, 300]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 128), (8, 2, 256), (4, 1, 40), (16, 2, 64)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_kernel_matches_torch(isa, dtype, hq, hkv, d, block_size):
    gen = torch.Generator().manual_seed(hq * 1000 + d + block_size)
    batch = _paged_batch(gen, [1] * len(RAGGED_CONTEXTS), RAGGED_CONTEXTS, block_size, hq, hkv, d, dtype)
    _compare(*batch, None, None, dtype)


@pytest.mark.parametrize("window,softcap", [(40, None), (1, None), (None, 30.0), (50, 20.0)])
def test_decode_kernel_window_and_softcap(isa, window, softcap):
    gen = torch.Generator().manual_seed(7)
    batch = _paged_batch(gen, [1] * len(RAGGED_CONTEXTS), RAGGED_CONTEXTS, 16, 8, 2, 64, torch.float32)
    _compare(*batch, window, softcap, torch.float32)


@pytest.mark.parametrize("num_reqs", [1, 2, 3, 40])
def test_decode_kernel_small_and_large_batches(isa, num_reqs):
    # Below 2 requests per thread the kernel gives each kv head its own task; above, one per request.
    gen = torch.Generator().manual_seed(num_reqs)
    contexts = torch.randint(0, 200, (num_reqs,), generator=gen).tolist()
    batch = _paged_batch(gen, [1] * num_reqs, contexts, 16, 12, 4, 64, torch.float32)
    _compare(*batch, None, None, torch.float32)


@pytest.mark.parametrize("threads", [2, 8])
@pytest.mark.parametrize("contexts,window", [([1000], None), ([1000], 300), ([5, 700], None), ([129], None)])
def test_decode_kernel_splits_long_contexts_of_small_batches(isa, threads, contexts, window):
    # Fewer (request, kv head) units than two per thread: the SIMD paths split each context into
    # parts merged after (some parts empty: the 5-token request, the window's tail).
    gen = torch.Generator().manual_seed(len(contexts) + threads)
    batch = _paged_batch(gen, [1] * len(contexts), contexts, 16, 9, 3, 64, torch.float32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(*batch, window, None, torch.float32)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("window", [None, 24])
def test_mixed_prefill_and_decode_step(isa, window):
    # Prompt chunks (with and without cached context) around decodes: the kernel serves only the decodes.
    gen = torch.Generator().manual_seed(3)
    batch = _paged_batch(gen, [1, 37, 1, 1, 16, 1], [90, 0, 5, 0, 48, 250], 16, 8, 2, 64, torch.float32)
    _compare(*batch, window, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
def test_short_chunks_run_on_the_decode_kernel(isa, window, softcap, dtype, monkeypatch):
    # Speculative verification's 1 + k query tokens over a cached context (and other chunks of at
    # most 16 tokens) go to the kernel one row per token, in the same call as the decodes; the
    # 17-token chunk keeps the SDPA path.
    query_lens, contexts = [5, 1, 2, 16, 17, 9, 1], [300, 40, 0, 63, 20, 129, 0]
    calls = []
    real = cpu_backend.decode_attention

    def counting(out, q, *args):
        calls.append(q.shape[0])
        real(out, q, *args)

    monkeypatch.setattr(cpu_backend, "decode_attention", counting)
    gen = torch.Generator().manual_seed(11)
    batch = _paged_batch(gen, query_lens, contexts, 16, 9, 3, 64, dtype)
    _compare(*batch, window, softcap, dtype)
    assert calls == [sum(n for n in query_lens if n <= cpu_backend.SHORT_QUERY_ROWS)]


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 1, 40), (8, 2, 24)])  # 40, 24: narrower paths' widths
def test_decode_kernel_float16(isa, hq, hkv, d):
    gen = torch.Generator().manual_seed(d)
    batch = _paged_batch(gen, [1] * len(RAGGED_CONTEXTS), RAGGED_CONTEXTS, 16, hq, hkv, d, torch.float16)
    _compare(*batch, None, None, torch.float16)


def test_empty_context_gives_zeros(isa):
    q = torch.randn(2, 4, 64)
    cache = torch.randn(3, 16, 2, 64)
    out = torch.full_like(q, float("nan"))
    torch.ops.pagellm_cpu.paged_decode_attention(out, q, cache, cache, torch.zeros(2, 1, dtype=torch.int32),
                                                 torch.tensor([0, 3], dtype=torch.int32), 0.125, 0, 0.0)
    assert torch.equal(out[0], torch.zeros(4, 64))
    weights = torch.softmax(torch.einsum("hd,thd->ht", q[1] * 0.125, cache[0, :3].repeat_interleave(2, 1)), -1)
    torch.testing.assert_close(out[1], torch.einsum("ht,thd->hd", weights, cache[0, :3].repeat_interleave(2, 1)),
                               **TOLERANCE[torch.float32])


def test_isa_switch_rejects_unknown_and_unsupported(monkeypatch):
    x, w = torch.randn(2, 8), torch.ones(8)
    monkeypatch.setenv(cpu_ops.ISA_ENV, "sse9")
    with pytest.raises(RuntimeError, match="PAGELLM_CPU_ISA=sse9"):
        torch.ops.pagellm_cpu.rms_norm(torch.empty_like(x), x, w, 1e-6)
    for name in (n for n in cpu_ops.ISA_NAMES if n not in cpu_ops.supported_isas()):
        monkeypatch.setenv(cpu_ops.ISA_ENV, name)
        with pytest.raises(RuntimeError, match="does not support"):
            cpu_ops.active_isa()
    monkeypatch.setenv(cpu_ops.ISA_ENV, "auto")
    assert cpu_ops.active_isa() == cpu_ops.supported_isas()[-1]


def test_kernel_rejects_bad_arguments():
    q = torch.randn(2, 4, 64)
    cache = torch.randn(3, 16, 2, 64)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_tables must be a contiguous int32"):
        torch.ops.pagellm_cpu.paged_decode_attention(torch.empty_like(q), q, cache, cache, tables.long(), lens,
                                                     0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="longer than its block table covers"):
        torch.ops.pagellm_cpu.paged_decode_attention(torch.empty_like(q), q, cache, cache, tables,
                                                     torch.full((2,), 17, dtype=torch.int32), 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="caches must have q's dtype"):
        torch.ops.pagellm_cpu.paged_decode_attention(torch.empty_like(q), q, cache.double(), cache.double(),
                                                     tables, lens, 0.1, 0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 67])  # 67: the loops' scalar tails
def test_fused_norm_and_activation_match_torch(isa, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(9, hidden, generator=gen).to(dtype) for _ in range(2))
    reference, fused = RMSNorm(hidden, 1e-5).to(dtype), RMSNorm(hidden, 1e-5).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    reference.weight.data.copy_(weight)
    fused.weight.data.copy_(weight)
    fused.enable_cpu_kernel()
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCE[dtype])
    expected, expected_residual = reference(x, residual.clone())
    got, got_residual = fused(x, residual.clone())
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    assert torch.equal(got_residual, expected_residual)  # the sum is rounded to the dtype either way
    # A non-contiguous input (Qwen3's per-head q/k norm) takes the torch path.
    wide = torch.randn(9, 2 * hidden, generator=gen).to(dtype)[:, :hidden]
    torch.testing.assert_close(fused(wide), reference(wide), **TOLERANCE[dtype])

    gate_up = (3 * torch.randn(5, 2 * hidden, generator=gen)).to(dtype)
    act = SiluAndMul()
    expected = act(gate_up)
    act.enable_cpu_kernel()
    torch.testing.assert_close(act(gate_up), expected, **TOLERANCE[dtype])
    extreme = torch.tensor([[-200.0, -90.0, 0.0, 90.0, 1.0, 2.0, 3.0, 4.0]], dtype=dtype)  # exp clamping
    torch.testing.assert_close(act(extreme), F.silu(extreme[:, :4]) * extreme[:, 4:], **TOLERANCE[dtype])


def test_prepack_availability_depends_on_dtype():
    assert cpu_prepack_available(torch.float32) == torch.backends.mkldnn.is_available()
    assert cpu_prepack_available(torch.float16) == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert not cpu_prepack_available(torch.float64)


def test_engine_starts_in_float16_whatever_the_cpu_packs(tmp_path):
    # fp16 prepacking needs AVX512-FP16; without it the engine must fall back, not fail to start.
    from conftest import make_tiny_llama
    from pagellm import LLM, SamplingParams

    llm = LLM(make_tiny_llama(str(tmp_path)), skip_tokenizer_init=True, dtype="float16", quiet=True,
              kv_cache_memory=4 << 20, max_model_len=256)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    packed = llm.llm_engine.core.runner.model.model.layers[0].mlp.down_proj.packed is not None
    assert packed == cpu_prepack_available(torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_matches_f_linear(dtype):
    if not cpu_prepack_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU/torch build")
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.plain = Linear(96, 200, bias=True)
    model.merged = MergedLinear(96, {"a": 64, "b": 32})
    embed = VocabEmbedding(300, 96)
    model.embed, model.head = embed, LMHead(300, 96, tied_to=embed)
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen))
    model = model.to(dtype)
    x = torch.randn(3, 7, 96, generator=gen).to(dtype)  # 3-D input, 21 rows
    expected = {name: m(x) for name, m in (("plain", model.plain), ("merged", model.merged), ("head", model.head))}
    assert prepack_cpu_weights(model) == 3
    assert model.plain.weight is None and model.merged.weight is None  # no second copy kept
    assert model.head.weight is model.embed.weight  # a tied head keeps the embedding's weight
    for name, m in (("plain", model.plain), ("merged", model.merged), ("head", model.head)):
        torch.testing.assert_close(m(x), expected[name], **TOLERANCE[dtype])
    with pytest.raises(RuntimeError, match="after prepack_for_cpu"):
        model.plain.load("weight", torch.zeros(200, 96))


def test_auto_backend_falls_back_to_torch_without_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert selector.resolve_backend_name("auto", cpu) == "cpu"
    monkeypatch.setattr(selector, "load_cpu_ops", lambda: False)
    assert selector.resolve_backend_name("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="'cpu' needs the C.. kernels"):
        selector.resolve_backend_name("cpu", cpu)


def test_enable_cpu_kernels_switches_norms_and_activations():
    model = torch.nn.Sequential(RMSNorm(8), SiluAndMul(), torch.nn.Linear(2, 2))
    assert enable_cpu_kernels(model) == 2
    assert model[0].use_cpu_kernel and model[1].use_cpu_kernel


FAST_PATHS_OFF = dict(attention_backend="torch", cpu_weight_prepack=False, cpu_fused_ops=False)
FAST_PATH_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.",
                     "List three prime numbers:" * 8]


@pytest.fixture(scope="module")
def fast_path_tokens(smollm_llm_fp32) -> list[list[int]]:
    """The shared engine's greedy tokens with every fast path on, computed once for the switches below."""
    from pagellm import SamplingParams

    assert smollm_llm_fp32.llm_engine.core.runner.backend.name == "cpu"  # every fast path on
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in smollm_llm_fp32.generate(FAST_PATH_PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("switch", ["all", "attention_backend", "cpu_weight_prepack", "cpu_fused_ops"])
def test_engine_greedy_identical_with_fast_paths_on_and_off(smollm_path, fast_path_tokens, switch):
    """Every CPU fast path on (the default engine) vs off: the same greedy tokens on the real model,
    over a batched prefill and 32 decode steps (the engines differ only in the switch). Both run the
    full-precision weights: prepacking is a path of plain linear weights, not of GGUF blocks."""
    from pagellm import LLM, SamplingParams

    off = FAST_PATHS_OFF if switch == "all" else {switch: FAST_PATHS_OFF[switch]}
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    slow_llm = LLM(smollm_path, max_model_len=512, kv_cache_memory=32 << 20, quiet=True, quantization="none", **off)
    slow_runner = slow_llm.llm_engine.core.runner
    assert (slow_runner.backend.name == "torch") == ("attention_backend" in off)
    layers = slow_runner.model.model.layers
    assert (layers[0].mlp.down_proj.packed is None) == ("cpu_weight_prepack" in off)
    assert layers[0].input_layernorm.use_cpu_kernel == ("cpu_fused_ops" not in off)
    assert layers[0].self_attn.rotary_emb.use_cpu_kernel == ("cpu_fused_ops" not in off)
    slow = [o.outputs[0].token_ids for o in slow_llm.generate(FAST_PATH_PROMPTS, params, use_tqdm=False)]
    assert slow == fast_path_tokens
