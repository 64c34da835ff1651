"""Triton attention kernels against the pure-torch backend (the reference).

Without a GPU the kernels run through Triton's CPU interpreter at small shapes. The interpreter
is switched on by TRITON_INTERPRET=1, read when triton is first imported, so those cases run in
a child process (this file run as a script) where nothing has imported triton yet; each case's
verdict comes back as JSON. With a GPU the same cases, and the full-shape grid, run in-process.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()

# Query/KV lengths per request: decodes (1, n), prompt chunks with cached context (q < kv), whole prompts.
ISSUE_LENS = [(1, 1328), (5, 18), (129, 463), (1, 2011)]
SMALL_MIXED = [(1, 40), (5, 18), (20, 50), (1, 33), (17, 17)]
DECODES = [(1, 300), (1, 18), (1, 77), (1, 1)]

# Small enough for the interpreter (the whole set runs in well under a minute on two cores).
CPU_CASES: dict[str, dict] = {
    "issue_lens_fp32_gqa4_bs32_d64": dict(lens=ISSUE_LENS, hq=8, hkv=2, d=64, bs=32, dtype="float32"),
    "mixed_bf16_gqa8_bs16_d64": dict(lens=SMALL_MIXED, hq=8, hkv=1, d=64, bs=16, dtype="bfloat16"),
    "mixed_fp32_gqa1_bs16_d128": dict(lens=SMALL_MIXED, hq=2, hkv=2, d=128, bs=16, dtype="float32"),
    "mixed_bf16_gqa4_bs32_d256": dict(lens=[(1, 70), (9, 40), (1, 5)], hq=4, hkv=1, d=256, bs=32, dtype="bfloat16"),
    "split_fp32_gqa4_bs16": dict(lens=DECODES, hq=8, hkv=2, d=64, bs=16, dtype="float32", splits=4),
    "split_auto_bf16_gqa8_bs32": dict(lens=DECODES, hq=8, hkv=1, d=64, bs=32, dtype="bfloat16", expect_split=True),
    "window_fp32_mixed": dict(lens=[(1, 140), (7, 50), (40, 90), (1, 77)], hq=4, hkv=1, d=64, bs=16,
                              dtype="float32", window=24),
    "window_split_fp32_decode": dict(lens=DECODES, hq=4, hkv=2, d=64, bs=16, dtype="float32", window=40, splits=4),
    "softcap_bf16_mixed": dict(lens=SMALL_MIXED, hq=4, hkv=2, d=64, bs=16, dtype="bfloat16", softcap=5.0),
    "graph_padding_fp32": dict(lens=[(1, 60), (1, 9), (1, 33)], hq=4, hkv=1, d=64, bs=16, dtype="float32", pad=3),
}

# Full shapes on a GPU: the issue's lengths over GQA 1/4/8, both block sizes, three head sizes, two dtypes.
GPU_CASES: dict[str, dict] = {
    f"{dtype}_gqa{g}_bs{bs}_d{d}": dict(lens=ISSUE_LENS, hq=8 * g, hkv=8, d=d, bs=bs, dtype=dtype)
    for dtype in ("bfloat16", "float32") for g in (1, 4, 8) for bs in (16, 32) for d in (64, 128, 256)
}
GPU_CASES.update({
    "gpu_split_bf16": dict(lens=[(1, 8000), (1, 3000)], hq=32, hkv=8, d=128, bs=16, dtype="bfloat16",
                           expect_split=True),
    "gpu_window_bf16": dict(lens=ISSUE_LENS, hq=32, hkv=8, d=128, bs=16, dtype="bfloat16", window=256),
    "gpu_softcap_bf16": dict(lens=ISSUE_LENS, hq=16, hkv=8, d=256, bs=32, dtype="bfloat16", softcap=50.0),
    "gpu_padding_bf16": dict(lens=[(1, 900)] * 5, hq=32, hkv=8, d=128, bs=16, dtype="bfloat16", pad=3),
})

TOLERANCES = {"float32": dict(atol=1e-3, rtol=0.0), "bfloat16": dict(atol=1.5e-2, rtol=1e-2)}


def run_case(case: dict, device: str, seed: int = 0) -> str | None:
    """Runs one case through both backends; None when they agree, else what differed."""
    from pagellm.attention.backend import build_metadata
    from pagellm.attention.torch_backend import TorchAttentionBackend
    from pagellm.attention.triton_reshape_and_cache import reshape_and_cache
    from pagellm.attention.triton_unified_attention import choose_num_splits, tile_shape, unified_attention

    dtype = getattr(torch, case["dtype"])
    bs, hq, hkv, d = case["bs"], case["hq"], case["hkv"], case["d"]
    gen = torch.Generator().manual_seed(seed)
    query_lens = [q for q, _ in case["lens"]]
    context_lens = [kv - q for q, kv in case["lens"]]
    counts = [-(-kv // bs) for _, kv in case["lens"]]
    num_blocks = sum(counts) + 4
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # random, non-contiguous block tables
    block_ids, used = [], 0
    for n in counts:
        block_ids.append(perm[used:used + n])
        used += n
    md = build_metadata(query_lens, context_lens, block_ids, bs, torch.device(device))
    t = sum(query_lens)
    q = torch.randn(t, hq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(t, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(t, hkv, d, generator=gen).to(dtype).to(device)
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=gen).to(dtype).to(device)  # cached context
    scale = d ** -0.5
    window, softcap = case.get("window"), case.get("softcap")

    ref_cache = cache.clone()
    ref = TorchAttentionBackend().forward(q, k, v, ref_cache, md, scale, window, softcap)

    # Padding requests as a CUDA graph adds them: one query token, slot -1, sequence length 0.
    pad = case.get("pad", 0)
    qsl = md.query_start_loc + [t + i + 1 for i in range(pad)]
    seq_lens = md.seq_lens + [0] * pad
    slots = torch.cat([md.slot_mapping, torch.full((pad,), -1, dtype=torch.long, device=device)])
    tables = torch.cat([md.block_tables, torch.zeros((pad, md.block_tables.shape[1]), dtype=torch.int32,
                                                     device=device)])
    q_in = torch.cat([q, torch.randn(pad, hq, d, generator=gen).to(dtype).to(device)])
    k_in = torch.cat([k, torch.randn(pad, hkv, d, generator=gen).to(dtype).to(device)])
    v_in = torch.cat([v, torch.randn(pad, hkv, d, generator=gen).to(dtype).to(device)])

    tri_cache = cache.clone()
    reshape_and_cache(k_in, v_in, tri_cache[0], tri_cache[1], slots)
    if not torch.equal(tri_cache, ref_cache):
        return "reshape_and_cache wrote a different cache than the torch backend"
    out = torch.full_like(q_in, float("nan"))
    splits = case.get("splits")
    if case.get("expect_split"):
        block_q = tile_shape(hq // hkv, 1, d)[1]
        auto = choose_num_splits(len(qsl) - 1 + (t + pad) // block_q, hkv, max(seq_lens), 1, bs, num_sms=132)
        if auto < 2:
            return f"the split-KV heuristic chose {auto} splits for a small long-context decode batch"
    unified_attention(q_in, tri_cache[0], tri_cache[1], out, torch.tensor(qsl, dtype=torch.int32, device=device),
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), tables,
                      max(query_lens), max(seq_lens), scale, window, softcap, num_splits=splits, num_sms=132)
    if pad and not torch.equal(out[t:], torch.zeros_like(out[t:])):
        return "padding rows (sequence length 0) should come out as zeros"
    try:
        torch.testing.assert_close(out[:t].float(), ref.float(), **TOLERANCES[case["dtype"]])
    except AssertionError as exc:
        return str(exc)
    return None


def _engine_parity() -> str | None:
    """A tiny random Llama generates the same greedy tokens with either backend (fp32, chunked prefill)."""
    import tempfile

    from conftest import make_tiny_llama
    from pagellm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_llama(tmp, hidden=128, heads=4, num_kv_heads=1, layers=2, seed=3)
        prompts = [{"prompt_token_ids": list(range(5 + i, 40 + 7 * i))} for i in range(3)]
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outs = {}
        for run in ("torch", "triton", "triton_padded_static_buffers"):
            backend = run.split("_")[0]
            llm = LLM(path, skip_tokenizer_init=True, attention_backend=backend, max_num_batched_tokens=32,
                      max_model_len=256, kv_cache_memory=4 << 20, max_num_seqs=8, quiet=True)
            runner = llm.llm_engine.core.runner
            if runner.backend.name != backend:
                return f"asked for the {backend} backend, got {runner.backend.name}"
            if run.endswith("static_buffers"):
                runner.graphs = _eager_decode_graphs(runner)
            outs[run] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            if run.endswith("static_buffers") and not runner.graphs.replays:
                return "decode steps never went through the static-buffer path"
        for run in ("triton", "triton_padded_static_buffers"):
            if outs[run] != outs["torch"]:
                return f"greedy tokens differ: torch {outs['torch']} vs {run} {outs[run]}"
    return None


def _eager_decode_graphs(runner):
    """The CUDA-graph decode path with each 'replay' run eagerly on the static buffers.

    Without a GPU nothing can be captured, but everything around the replay can be checked:
    padding a batch to a captured size, slot -1 and length 0 for padding rows, reading only the
    static tensors of the captured metadata.
    """
    from pagellm.forward_context import set_forward_context
    from pagellm.worker.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(runner.model, runner.config.max_num_seqs, runner.config.max_model_len,
                          runner.block_size, runner.device)
    graphs.replays = []

    class EagerReplay:
        def __init__(self, batch: int) -> None:
            self.batch = batch
            self.metadata = graphs._metadata(batch)  # built once, as at capture time

        def replay(self) -> None:
            graphs.replays.append(self.batch)
            with set_forward_context(self.metadata):
                out = runner.model(graphs.input_ids[:self.batch], graphs.positions[:self.batch])
            graphs.outputs[self.batch].copy_(out)

    hidden = runner.model_config.hidden_size
    for batch in graphs.sizes:
        graphs.graphs[batch] = EagerReplay(batch)
        graphs.outputs[batch] = torch.empty(batch, hidden, dtype=runner.dtype)
    return graphs


def _interpreter_worker() -> int:
    import triton.runtime.interpreter as interpreter

    from pagellm.attention.triton_unified_attention import _unified_attention_kernel

    results: dict[str, str | None] = {}
    if not isinstance(_unified_attention_kernel, interpreter.InterpretedFunction):
        results["interpreter_active"] = "the kernels were compiled, not interpreted: TRITON_INTERPRET was not honoured"
    else:
        results["interpreter_active"] = None
    for name, case in CPU_CASES.items():
        results[name] = run_case(case, "cpu")
    results["engine_parity"] = _engine_parity()
    print(json.dumps(results))
    return 0


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    from conftest import early_subprocess_result

    returncode, stdout, stderr = early_subprocess_result(os.path.basename(__file__))
    assert returncode == 0, f"interpreter run failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["interpreter_active", *CPU_CASES, "engine_parity"])
def test_interpreter_matches_torch(name, interpreter_results):
    assert name in interpreter_results, f"the interpreter run did not report {name}"
    assert interpreter_results[name] is None, interpreter_results[name]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", [*CPU_CASES, *GPU_CASES])
def test_gpu_matches_torch(name):
    case = CPU_CASES.get(name) or GPU_CASES[name]
    assert run_case(case, "cuda") is None


def test_split_kv_heuristic():
    from pagellm.attention.triton_unified_attention import choose_num_splits, tile_shape

    # Llama-3.1-8B decode (8 KV heads, group 4 -> 4 tokens per tile) on 132 SMs.
    assert tile_shape(4, 1, 128) == (16, 4) and tile_shape(4, 500, 128) == (64, 16) and tile_shape(4, 500, 256) == (32, 8)
    assert choose_num_splits(1 // 4 + 1, 8, 8192, 1, 16, 132) == 16  # batch 1, long context: split
    assert choose_num_splits(1 // 4 + 1, 8, 100, 1, 16, 132) == 1  # short context: not worth it
    assert choose_num_splits(256 // 4 + 256, 8, 8192, 1, 16, 132) == 1  # the GPU is full already
    assert choose_num_splits(1, 8, 8192, 7, 16, 132) == 1  # prompt chunks never split
    splits = choose_num_splits(8 // 4 + 8, 8, 8192, 1, 16, 132)
    assert 2 <= splits <= 16 and splits & (splits - 1) == 0


def test_selector_choices(monkeypatch):
    from pagellm.attention.selector import resolve_backend_name, triton_importable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend_name("auto", cpu) == "cpu"  # the C++ kernels (tests/test_cpu_kernels.py)
    assert resolve_backend_name("torch", cuda) == "torch"
    with pytest.raises(ValueError, match="'cpu' runs on the CPU only"):
        resolve_backend_name("cpu", cuda)
    assert resolve_backend_name("auto", cuda) == ("triton" if triton_importable() else "torch")
    with pytest.raises(ValueError, match="attention_backend: 'triton' needs a CUDA device"):
        resolve_backend_name("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend_name("flash", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend_name("triton", cpu) == "triton"


def test_forcing_triton_on_cpu_fails_clearly(tmp_path, monkeypatch):
    from conftest import make_tiny_llama
    from pagellm import LLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = make_tiny_llama(str(tmp_path))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(path, skip_tokenizer_init=True, attention_backend="triton", device="cpu", quiet=True)


if __name__ == "__main__":
    sys.exit(_interpreter_worker())
