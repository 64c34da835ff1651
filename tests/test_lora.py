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
    "head4": (4, 8, ["v_proj", "lm_head"], False),
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
               max_cpu_loras=3, max_model_len=64, kv_cache_memory=48 << 10,
               max_num_batched_tokens=16)


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


def test_mixed_batch_with_chunked_prefill_and_preemption_equals_alone(lora_llm, adapters):
    """Base + 4 adapters (max_loras=2, so adapters swap) in one generate call, prompts chunked over
    16-token steps and a KV pool too small for all at once: each request gives what it gives alone."""
    engine = lora_llm.llm_engine
    loras = [None, lora_req(adapters, "qv4"), lora_req(adapters, "all8"), lora_req(adapters, "mlp2"),
             lora_req(adapters, "qkv16"), lora_req(adapters, "qv4"), None, lora_req(adapters, "all8")]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    params = greedy(12)
    alone = [lora_llm.generate([p], params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
             for p, lora in zip(prompts, loras)]
    lora_llm.reset_prefix_cache()
    preemptions = engine.core.scheduler.num_preemptions_total
    swaps = engine.core.runner.lora.num_swaps
    together = lora_llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert engine.core.scheduler.num_preemptions_total > preemptions, "the KV pool should have forced preemption"
    assert engine.core.runner.lora.num_swaps > swaps and engine.core.runner.lora.num_evictions > 0
    assert len(engine.core.runner.lora.slot_of) <= 2 and len(engine.core.runner.lora.host) <= 3
    assert engine.core.num_free_blocks == engine.core.num_blocks
    assert len({tuple(t) for t in alone}) > 3  # adapters (and the base) really give different outputs


def test_tensor_parallel_matches_one_rank(lora_llm, lora_base, adapters):
    """tp=2 (A/B sharded to the column and row layers, the embedding's and LM head's terms added
    after their collectives): base and adapters mixed in one call give tp=1's greedy tokens."""
    loras = [None, lora_req(adapters, "all8"), lora_req(adapters, "mlp2"), lora_req(adapters, "head4"),
             lora_req(adapters, "qkv16")]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    params = greedy(8)
    ref = [o.outputs[0].token_ids for o in lora_llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    base = [o.outputs[0].token_ids for o in lora_llm.generate(prompts, params, use_tqdm=False)]
    assert all(r != b for r, b in zip(ref[1:], base[1:])), "each adapter must change its request's tokens"
    llm = LLM(lora_base, skip_tokenizer_init=True, quiet=True, enable_lora=True, max_loras=4, max_lora_rank=16,
              max_model_len=64, kv_cache_memory=1 << 20, tensor_parallel_size=2)
    try:
        got = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        assert [o.outputs[0].token_ids for o in got] == ref
        assert llm.llm_engine.core.num_free_blocks == llm.llm_engine.core.num_blocks
    finally:
        llm.llm_engine.core.executor.shutdown()


def test_speculative_decoding_with_adapters_keeps_the_greedy_tokens(lora_llm, lora_base, adapters):
    """The base model drafts (draft_model, no adapter) for base and adapter requests in one batch: the
    base's proposals are all accepted, an adapter's are often rejected, and every request still gets
    the tokens it gets without speculation: verification applies the request's adapter at every
    proposal position."""
    loras = [None, lora_req(adapters, "all8"), lora_req(adapters, "qv4"), None, lora_req(adapters, "head4")]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    params = greedy(12)
    ref = [o.outputs[0].token_ids for o in lora_llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    llm = LLM(lora_base, skip_tokenizer_init=True, quiet=True, enable_lora=True, max_loras=4, max_lora_rank=16,
              max_model_len=64, kv_cache_memory=1 << 20,
              speculative_config={"method": "draft_model", "model": lora_base, "num_speculative_tokens": 3,
                                  "disable_by_batch_size": 0, "draft_token_cost": 0})
    try:
        got = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        assert [o.outputs[0].token_ids for o in got] == ref
        stats = llm.llm_engine.core.scheduler.spec.stats
        assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
        assert llm.llm_engine.core.num_free_blocks == llm.llm_engine.core.num_blocks
    finally:
        llm.llm_engine.core.executor.shutdown()


def test_prefix_cache_does_not_cross_adapters(lora_llm, adapters):
    prompt = list(range(40, 80))  # two full blocks and more
    qv4, all8 = lora_req(adapters, "qv4"), lora_req(adapters, "all8")
    lora_llm.reset_prefix_cache()
    first = lora_llm.generate([prompt], greedy(4), use_tqdm=False, lora_request=qv4)[0]
    again = lora_llm.generate([prompt], greedy(4), use_tqdm=False, lora_request=qv4)[0]
    other = lora_llm.generate([prompt], greedy(4), use_tqdm=False, lora_request=all8)[0]
    base = lora_llm.generate([prompt], greedy(4), use_tqdm=False)[0]
    assert again.num_cached_tokens >= 32 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    lora_llm.reset_prefix_cache()
    assert lora_llm.generate([prompt], greedy(4), use_tqdm=False, lora_request=all8)[0].outputs[0].token_ids == \
        other.outputs[0].token_ids


def test_adapter_waiting_for_a_slot_is_not_starved():
    from pagellm.core.kv_cache_manager import KVCacheManager
    from pagellm.core.scheduler import Scheduler
    from pagellm.lora.admission import LoRAAdmission
    from pagellm.request import Request

    sched = Scheduler(KVCacheManager(64, 16), max_num_seqs=8, max_num_batched_tokens=256, max_model_len=64,
                      lora=LoRAAdmission(max_loras=2))

    def add(rid, lora_id):
        lora = None if lora_id is None else LoRARequest(f"a{lora_id}", lora_id, "/unused")
        sched.add_request(Request(rid, [1, 2, 3], SamplingParams(max_tokens=50), lora_request=lora))

    add("r1", 1), add("r2", 2), add("r3", 3), add("r4", 1), add("r5", None)
    out = sched.schedule()
    # r3's adapter does not fit; r4 (adapter 1, running) queued behind it waits too; r5 (base) passes
    assert sorted(out.num_scheduled_tokens) == ["r1", "r2", "r5"]
    sched.finish_requests(["r1"])
    out = sched.schedule()
    assert "r3" in out.num_scheduled_tokens and "r4" not in out.num_scheduled_tokens
    assert {r.lora_request.lora_int_id for r in sched.running if r.lora_request} == {2, 3}


def _bad_adapter_error(lora_llm, lora: LoRARequest) -> str:
    with pytest.raises(ValueError) as info:
        lora_llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False, lora_request=lora)
    assert lora_llm.llm_engine.core.num_free_blocks == lora_llm.llm_engine.core.num_blocks
    return str(info.value)


def test_bad_adapters_are_refused_before_queueing(lora_llm, lora_base, adapters, tmp_path):
    big = make_adapter(lora_base, str(tmp_path / "r32"), 32, 32, ["q_proj"], False, seed=9)
    assert "max_lora_rank" in _bad_adapter_error(lora_llm, LoRARequest("r32", 90, big))
    other_base = make_tiny_llama(str(tmp_path / "other-base"), hidden=32, heads=2, tie=False)
    wrong = make_adapter(other_base, str(tmp_path / "wrong"), 4, 8, ["q_proj"], False, seed=9)
    assert "the base model needs" in _bad_adapter_error(lora_llm, LoRARequest("wrong", 91, wrong))
    assert "no adapter_config.json" in _bad_adapter_error(lora_llm, LoRARequest("none", 92, str(tmp_path)))
    assert "already names adapter" in _bad_adapter_error(lora_llm, LoRARequest("other", 1, adapters["all8"]))
    # a pickled adapter is refused unless asked for
    from pagellm.lora.adapter import load_adapter
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(open(os.path.join(adapters["qv4"], "adapter_config.json")).read())
    torch.save(load_file(os.path.join(adapters["qv4"], "adapter_model.safetensors")), pickled / "adapter_model.bin")
    assert "adapter_model.bin" in _bad_adapter_error(lora_llm, LoRARequest("pickled", 93, str(pickled)))
    config = lora_llm.llm_engine.setup.model_config
    assert load_adapter(str(pickled), "pickled", 93, config, 16, allow_bin=True).rank == 4
    dora = json.loads((pickled / "adapter_config.json").read_text()) | {"use_dora": True}
    (pickled / "adapter_config.json").write_text(json.dumps(dora))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(str(pickled), "pickled", 93, config, 16, allow_bin=True)


def test_lora_request_needs_enable_lora(tiny_llama, adapters):
    llm = LLM(tiny_llama, skip_tokenizer_init=True, quiet=True, max_model_len=64, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match="enable_lora"):
        llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False, lora_request=lora_req(adapters, "qv4"))


@pytest.mark.parametrize("slices", [1, 3])
def test_grouped_ops_match_token_by_token(slices):
    from pagellm.lora.layers import add_lora_grouped_slices
    from pagellm.lora.ops import add_lora_grouped, add_lora_masked_dense, add_lora_reference, build_mapping

    torch.manual_seed(slices)
    num_slots, rank, d_in = 3, 4, 24
    sizes = [8, 4, 4][:slices]
    a = torch.randn(num_slots, slices * rank, d_in)
    bs = [torch.randn(num_slots, rank, s) for s in sizes]
    b_full = torch.zeros(num_slots, slices * rank, sum(sizes))  # block-diagonal: the reference's layout
    off = 0
    for j, (b, s) in enumerate(zip(bs, sizes)):
        b_full[:, j * rank:(j + 1) * rank, off:off + s] = b
        off += s
    slice_spec = [(str(j), sum(sizes[:j]), s) for j, s in enumerate(sizes)]
    for req_slots, qlens in (([0, -1, 2, 0, 1], [3, 2, 5, 1, 1]), ([1, 1], [4, 1]), ([-1, 2], [2, 3])):
        x = torch.randn(sum(qlens), d_in)
        mapping = build_mapping(req_slots, qlens, torch.float32, torch.device("cpu"))
        want = add_lora_reference(torch.zeros(x.shape[0], sum(sizes)), x, a, b_full, mapping.token_slots)
        got = add_lora_grouped_slices(torch.zeros_like(want), x, a, bs, slice_spec, rank, mapping)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if slices == 1:
            torch.testing.assert_close(add_lora_grouped(torch.zeros_like(want), x, a, bs[0], mapping), want,
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(add_lora_masked_dense(torch.zeros_like(want), x, a, bs[0], mapping), want,
                                       rtol=1e-4, atol=1e-4)
    assert build_mapping([-1, -1], [2, 3], torch.float32, torch.device("cpu")) is None


# -- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_server(tiny_chat_model, tmp_path_factory):
    """An AsyncLLM (core on a thread) over the tiny chat model with LoRA on, and adapters built for it."""
    from pagellm.config import EngineConfig
    from pagellm.engine.async_llm import AsyncLLM

    root = tmp_path_factory.mktemp("server-adapters")
    paths = {"sql": make_adapter(tiny_chat_model, str(root / "sql"), 4, 8, ["q_proj", "v_proj", "down_proj"],
                                 False, seed=11),
             "big": make_adapter(tiny_chat_model, str(root / "big"), 16, 16, ["q_proj"], False, seed=12)}
    engine = AsyncLLM.from_config(EngineConfig(model=tiny_chat_model, max_model_len=128, kv_cache_memory=4 << 20,
                                               enable_lora=True, max_loras=2, max_lora_rank=8),
                                  engine_process=False, quiet=True)
    engine.intake.loras.add("sql", paths["sql"])  # what --lora-modules sql=PATH does at start-up
    yield engine, paths
    engine.shutdown()


def test_server_lists_loads_uses_and_unloads_adapters(lora_server):
    import asyncio

    import httpx

    from pagellm.entrypoints.openai.server import build_app

    engine, paths = lora_server

    async def main():
        transport = httpx.ASGITransport(app=build_app(engine, "tiny"))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            def complete(model, **extra):
                return client.post("/v1/completions", json={"model": model, "prompt": "Hello there", "max_tokens": 6,
                                                            "temperature": 0, "ignore_eos": True, **extra})

            models = (await client.get("/v1/models")).json()["data"]
            assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("sql", "tiny")]
            base, sql = (await complete("tiny")).json(), (await complete("sql")).json()
            assert base["choices"][0]["text"] != sql["choices"][0]["text"]
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": paths["sql"]})
            assert r.status_code == 200, r.text
            assert (await complete("new")).json()["choices"][0]["text"] == sql["choices"][0]["text"]
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": paths["sql"]})
            assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
            # unloading while a request still runs under the adapter: 409, then 200 once it finished
            long = asyncio.ensure_future(complete("new", max_tokens=100))
            while not (engine.get_stats() and engine.get_stats().lora_running.get("new")):
                await asyncio.sleep(0.002)
            metrics = (await client.get("/metrics")).text
            busy = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
            assert (await long).status_code == 200
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_in_use"
            assert any('lora_name="new"' in line and 'state="running"' in line and line.endswith(" 1.0")
                       for line in metrics.splitlines())
            r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
            assert r.status_code == 200, r.text
            gone = await complete("new")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
            r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
            assert r.status_code == 404
            bad = {"big": "max_lora_rank", "x": "the base model needs", "nowhere": "is not a directory"}
            for name, why in bad.items():
                path = paths.get(name) or (lora_base_adapter if name == "x" else "/nonexistent")
                r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
                assert why in r.json()["error"]["message"]
            assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["tiny", "sql"]
        return await engine.wait_for_stats()

    other_base = make_tiny_llama(os.path.join(paths["sql"], "..", "narrow-base"), hidden=32, heads=2, tie=False)
    lora_base_adapter = make_adapter(other_base, os.path.join(paths["sql"], "..", "wrong-base"), 4, 8, ["q_proj"],
                                     False, seed=13)
    stats = asyncio.run(main())
    assert stats.kv_cache_usage == 0 and stats.num_running == 0 and not stats.lora_running
