"""`pagellm bench throughput | latency` end to end on a tiny random Llama (pagellm and HF on the
same prompts), and engine flags reaching the engine from the bench commands."""

from __future__ import annotations

import glob
import json
import os

import pytest

from pagellm.entrypoints.cli import build_parser, engine_kwargs, main
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-bench")), vocab_size=512)


def _result(result_dir, kind: str) -> dict:
    paths = glob.glob(os.path.join(result_dir, f"{kind}-*.json"))
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
        return json.load(f)


def test_engine_flags_reach_bench_commands():
    parser = build_parser()
    args = parser.parse_args(["bench", "throughput", "--no-enable-prefix-caching", "--max-num-seqs", "7",
                              "--dataset", "prefix-shared", "--prefix-len", "32", "--num-prefixes", "2"])
    assert engine_kwargs(args) == {"enable_prefix_caching": False, "max_num_seqs": 7}
    assert (args.prefix_len, args.num_prefixes, args.suffix_len) == (32, 2, 64)
    args = parser.parse_args(["bench", "latency", "--enable-prefix-caching", "false", "--batch-size", "4"])
    assert engine_kwargs(args) == {"enable_prefix_caching": False} and args.batch_size == 4


def test_throughput_pagellm_and_hf(tiny_model, tmp_path, capsys):
    out_dir = str(tmp_path / "res")
    rc = main(["bench", "throughput", "--model", tiny_model, "--skip-tokenizer-init", "--kv-cache-memory",
               str(4 << 20), "--backend", "pagellm,hf", "--hf-batch-size", "1,4", "--hf-max-batches", "2",
               "--num-prompts", "6", "--input-len", "10", "--output-len", "5", "--result-dir", out_dir,
               "--disable-tqdm"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pagellm / HF best" in printed
    res = _result(out_dir, "throughput")
    assert res["config"]["num_prompts"] == 6 and res["config"]["engine"]["skip_tokenizer_init"] == "True"
    assert res["environment"]["versions"]["torch"] and res["environment"]["cpu_count"] >= 1
    p = res["results"]["pagellm"]
    assert (p["num_requests"], p["input_tokens"], p["output_tokens"]) == (6, 60, 30)
    assert p["output_tokens_per_s"] == pytest.approx(30 / p["elapsed_s"])
    assert 0 < p["peak_kv_cache_usage"] <= 1 and p["preemptions"] == 0
    assert p["model_tflops"] > 0 and p["fraction_of_matmul_peak"] > 0
    hf = res["results"]["hf"]
    assert [h["batch_size"] for h in hf] == [1, 4]
    assert [h["num_requests"] for h in hf] == [2, 6]  # at most 2 batches each
    assert hf[0]["output_tokens"] == 10 and hf[1]["generated_with_padding"] == 30
    best = max(h["output_tokens_per_s"] for h in hf)
    assert res["results"]["pagellm_over_hf_best"] == pytest.approx(p["output_tokens_per_s"] / best)


def test_hf_static_batches_count_only_useful_tokens(tiny_model):
    from pagellm.benchmarks.datasets import SampleRequest
    from pagellm.benchmarks.throughput import load_hf_model, run_hf
    from pagellm.loader import resolve_model

    model = load_hf_model(resolve_model(tiny_model))
    samples = [SampleRequest([5, 6, 7, 8, 9], 2), SampleRequest([10, 11, 12], 6), SampleRequest([13, 14], 3)]
    r = run_hf(model, samples, batch_size=2, pad_id=0, show_progress=False)
    # batch 1 pads to 5 prompt tokens and runs 6 steps for both rows; batch 2 runs 3 steps
    assert r["generated_with_padding"] == 2 * 6 + 3
    assert (r["output_tokens"], r["input_tokens"], r["num_requests"]) == (11, 10, 3)


def test_latency(tiny_model, tmp_path, capsys):
    out_dir = str(tmp_path / "res")
    assert main(["bench", "latency", "--model", tiny_model, "--skip-tokenizer-init", "--kv-cache-memory",
                 str(4 << 20), "--batch-size", "3", "--input-len", "12", "--output-len", "6", "--num-iters-warmup",
                 "1", "--num-iters", "2", "--result-dir", out_dir, "--disable-tqdm"]) == 0
    assert "ms/token" in capsys.readouterr().out
    res = _result(out_dir, "latency")["results"]
    assert res["batch_size"] == 3 and len(res["iterations"]) == 2
    for it in res["iterations"]:
        assert 0 < it["prefill_s"] <= it["e2e_s"]
        assert it["decode_per_token_s"] == pytest.approx((it["e2e_s"] - it["prefill_s"]) / 5)
    assert res["e2e"]["min_ms"] <= res["e2e"]["median_ms"] <= res["e2e"]["p90_ms"] <= res["e2e"]["max_ms"]


def test_bad_backend_is_a_clear_error(tiny_model, tmp_path, capsys):
    rc = main(["bench", "throughput", "--model", tiny_model, "--backend", "vllm", "--result-dir", str(tmp_path)])
    assert rc == 2 and "--backend" in capsys.readouterr().err


def test_throughput_on_a_config_only_dir_with_dummy_weights(tmp_path):
    """The GPU benchmark's path: no checkpoint, no tokenizer; both backends get random weights."""
    from transformers import LlamaConfig

    model_dir = str(tmp_path / "config-only")
    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128).save_pretrained(model_dir)
    out_dir = str(tmp_path / "res")
    rc = main(["bench", "throughput", "--model", model_dir, "--load-format", "dummy", "--skip-tokenizer-init",
               "--kv-cache-memory", str(1 << 20), "--backend", "pagellm,hf", "--hf-batch-size", "2",
               "--num-prompts", "4", "--input-len", "6", "--output-len", "3", "--result-dir", out_dir,
               "--disable-tqdm"])
    assert rc == 0
    res = _result(out_dir, "throughput")["results"]
    assert res["pagellm"]["output_tokens"] == 12 and res["hf"][0]["output_tokens"] == 12


def test_prefix_shared_reports_hits_and_counts_only_computed_flops(tiny_model, tmp_path):
    tflops = {}
    for flag in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        out_dir = str(tmp_path / flag)
        assert main(["bench", "throughput", "--model", tiny_model, "--skip-tokenizer-init", flag,
                     "--kv-cache-memory", str(4 << 20), "--dataset", "prefix-shared", "--num-prefixes", "1",
                     "--prefix-len", "64", "--suffix-len", "8", "--num-prompts", "4", "--output-len", "2",
                     "--result-dir", out_dir, "--disable-tqdm"]) == 0
        p = _result(out_dir, "throughput")["results"]["pagellm"]
        tflops[flag] = p["model_tflops"]
        if flag == "--enable-prefix-caching":
            # The prefix is computed once (the first request), then 64 tokens (4 blocks of 16) hit per request.
            assert p["prefix_cache_hit_rate"] == pytest.approx(3 * 64 / (4 * 72))
        else:
            assert p["prefix_cache_hit_rate"] == 0
    assert tflops["--enable-prefix-caching"] < tflops["--no-enable-prefix-caching"]


def test_edit_like_dataset_in_latency_and_throughput(tiny_chat_model, tmp_path, capsys, monkeypatch):
    """Text prompts through the model's tokenizer (`bench serve` builds them the same way)."""
    monkeypatch.setattr("pagellm.benchmarks.flops.matmul_flops_per_s", lambda *a, **k: 1e9)  # 2 s, not tested here
    common = ["--model", tiny_chat_model, "--kv-cache-memory", str(4 << 20), "--max-model-len", "256",
              "--dataset", "edit-like", "--input-len", "64", "--output-len", "4", "--disable-tqdm"]
    assert main(["bench", "latency", *common, "--batch-size", "2", "--num-iters-warmup", "0", "--num-iters", "1",
                 "--result-dir", str(tmp_path / "lat")]) == 0
    assert "edit-like batch 2" in capsys.readouterr().out
    config = _result(str(tmp_path / "lat"), "latency")["config"]
    assert config["dataset"] == "edit-like" and 64 < config["mean_input_len"] < 200
    assert main(["bench", "throughput", *common, "--num-prompts", "2", "--result-dir", str(tmp_path / "tp")]) == 0
    res = _result(str(tmp_path / "tp"), "throughput")
    assert res["config"]["dataset"] == "edit-like" and res["results"]["pagellm"]["output_tokens"] == 8


def test_collectives_dispatch_is_a_real_decode_step_and_the_table_adds_up():
    from pagellm.benchmarks.collectives import decode_step_output, format_table, measure_dispatch, step_rows

    out = decode_step_output(4)
    assert not out.scheduled_new_reqs and len(out.num_scheduled_tokens) == 4
    assert set(out.num_scheduled_tokens.values()) == {1}  # every request decodes one token
    (size, rtt_us), = measure_dispatch([4], iters=3)
    assert size > 0 and rtt_us > 0
    row, = step_rows([4], [(10.0, 5.0)], [(size, rtt_us)], layers=3)
    assert row["per_step_us"] == pytest.approx(rtt_us + 3 * 2 * 10.0 + 5.0)
    table = format_table({"tp": 2, "hidden": 8, "vocab": 64, "layers": 3, "rows": [row]})
    assert f"{row['per_step_us']:.1f}" in table.splitlines()[-1]
