"""The engine on a GPU: Triton attention + CUDA graphs against torch attention run eagerly (bf16).

Skipped without a CUDA GPU. The model is a random-weight Llama saved with transformers (head size
64, GQA 4). Prompts are long enough for chunked prefill with cached context, and the batch mixes
prompt chunks with decodes.
"""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import first_divergence, make_tiny_llama
from pagellm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 2000 + 3 for j in range(n)]}
           for i, n in enumerate([5, 17, 64, 300, 700, 1, 33, 129, 2, 450])]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("gpu-llama")), vocab_size=2048, hidden=512, layers=4,
                           heads=8, num_kv_heads=2, seed=0)


def generate(path: str, **engine_args):
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=16,
              max_num_batched_tokens=256, gpu_memory_utilization=0.3, quiet=True, **engine_args)
    runner = llm.llm_engine.core.runner
    info = dict(backend=runner.backend.name, graphs=runner.graphs is not None, profile=runner.memory_profile,
                num_blocks=runner.num_blocks)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True),
                        use_tqdm=False)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return outs, info


@pytest.fixture(scope="module")
def runs(model_dir):
    return {
        "torch_eager": generate(model_dir, attention_backend="torch", enforce_eager=True),
        "triton_graphs": generate(model_dir, attention_backend="auto"),
        "triton_eager": generate(model_dir, attention_backend="triton", enforce_eager=True),
    }


def test_auto_picks_triton_with_graphs_and_a_profiled_pool(runs):
    info = runs["triton_graphs"][1]
    assert info["backend"] == "triton" and info["graphs"]
    assert info["profile"] is not None and info["profile"].peak_activation_bytes > 0
    assert info["num_blocks"] * 16 >= 1024
    assert runs["torch_eager"][1]["backend"] == "torch" and not runs["torch_eager"][1]["graphs"]


def test_triton_with_graphs_matches_torch_eager(runs):
    """Equal greedy tokens, except where bf16 noise splits a near tie (each side's token in the other's top-5)."""
    near_ties = []
    for i, (ref, out) in enumerate(zip(runs["torch_eager"][0], runs["triton_graphs"][0])):
        a, b = ref.outputs[0], out.outputs[0]
        d = first_divergence(a.token_ids, b.token_ids)
        if d is None:
            continue
        assert d < MAX_TOKENS, f"prompt {i}: one side stopped early"
        assert b.token_ids[d] in a.logprobs[d] and a.token_ids[d] in b.logprobs[d], f"prompt {i}: diverged at {d}"
        near_ties.append((i, d))
    assert len(near_ties) <= len(PROMPTS) // 3, f"too many divergences for near ties: {near_ties}"


def test_cuda_graphs_on_off_identical(runs):
    eager = [o.outputs[0].token_ids for o in runs["triton_eager"][0]]
    graphs = [o.outputs[0].token_ids for o in runs["triton_graphs"][0]]
    assert eager == graphs


def test_full_budget_error_names_the_numbers(model_dir):
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.001"):
        LLM(model_dir, skip_tokenizer_init=True, device="cuda", gpu_memory_utilization=0.001, max_model_len=1024,
            quiet=True)
