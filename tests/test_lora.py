"""Multi-LoRA serving (pagellm/lora): PEFT adapters against HF + PEFT, mixed batches, slots and swaps.

Adapters are random PEFT LoRAs built here with `peft` on a tiny random Llama (`init_lora_weights=False`
gives B != 0, so every adapter changes the output), saved as real adapter directories.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tiny_llama
from pagellm import LLM, SamplingParams
from pagellm.lora import LoRARequest

peft = pytest.importorskip("peft")

PROMPTS = [[5, 17, 99, 3, 250, 31, 8, 77, 12, 400, 61, 2, 9, 140, 33, 71, 20],
           [300, 11, 45, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 1],
           [99, 98, 97]]
# name -> (rank, alpha, targets, rslora)
ADAPTERS = {
    "qv4": (4, 8, ["q_proj", "v_proj"], False),
    "all8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp2": (2, 4, ["o_proj", "down_proj", "embed_tokens"], False),
    "qkv16": (16, 16, ["q_proj", "k_proj", "v_proj", "up_proj"], False),
}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def make_adapter(base: str, out: str, rank: int, alpha: int, targets: list[str], rslora: bool, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        use_rslora=rslora, lora_dropout=0.0)
    model = get_peft_model(_hf_model(base), config)
    with torch.no_grad():  # PEFT's random B is small; make the adapter matter for greedy tokens
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(4.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("lora-base")), seed=5, tie=False)


@pytest.fixture(scope="module")
def adapters(lora_base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(lora_base, str(root / name), *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


def lora_req(adapters, name: str) -> LoRARequest:
    return LoRARequest(name, list(ADAPTERS).index(name) + 1, adapters[name])


@pytest.fixture(scope="module")
def lora_llm(lora_base):
    return LLM(lora_base, skip_tokenizer_init=True, quiet=True, enable_lora=True, max_loras=2, max_lora_rank=16,
               max_cpu_loras=3, max_model_len=128, kv_cache_memory=4 << 20)


def greedy(max_tokens: int = 8, logprobs=None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def hf_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                             top_p=None, top_k=None, temperature=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, lps


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_greedy_and_logprobs_match_hf_peft(lora_llm, lora_base, adapters, name):
    from peft import PeftModel

    n = 6
    lora = lora_req(adapters, name)
    outs = lora_llm.generate(PROMPTS[:2], greedy(n, logprobs=0), use_tqdm=False, lora_request=lora)
    unmerged = PeftModel.from_pretrained(_hf_model(lora_base), adapters[name]).eval()
    base_tokens = lora_llm.generate(PROMPTS[:2], greedy(n), use_tqdm=False)
    merged = PeftModel.from_pretrained(_hf_model(lora_base), adapters[name]).merge_and_unload().eval()
    differs = False
    for prompt, out, base in zip(PROMPTS[:2], outs, base_tokens):
        tokens, lps = hf_reference(unmerged, prompt, n)
        assert out.outputs[0].token_ids == tokens
        ours = [entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, tokens)]
        assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-3
        assert hf_reference(merged, prompt, n)[0] == tokens
        differs |= base.outputs[0].token_ids != tokens
    assert differs, "the adapter did not change any output: the test would not see a missing LoRA"
