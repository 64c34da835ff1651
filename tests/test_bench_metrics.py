"""Benchmark arithmetic without a model: serving metrics on a recorded trace, dataset generators'
length statistics, model FLOP counts, Poisson arrivals."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from pagellm.benchmarks import datasets as ds
from pagellm.benchmarks.flops import ModelShape
from pagellm.benchmarks.metrics import RequestTrace, distribution_ms, format_summary, summarize
from pagellm.benchmarks.serve import arrival_delays, parse_rate, request_body, ServeConfig


# -- metrics on a recorded trace ----------------------------------------------------------------------
def _trace() -> list[RequestTrace]:
    # Request A: sent at 10.0, chunks at 10.5, 10.6, 10.8, 11.1, stream closed at 11.2; 4 output tokens.
    a = RequestTrace(send_time=10.0, chunk_times=[10.5, 10.6, 10.8, 11.1], end_time=11.2, prompt_tokens=100,
                     output_tokens=4)
    # Request B: sent at 10.2, two chunks, the second carrying two tokens (3 output tokens).
    b = RequestTrace(send_time=10.2, chunk_times=[11.2, 11.7], end_time=11.7, prompt_tokens=50, output_tokens=3)
    # Request C failed; it must not count anywhere but `failed`.
    c = RequestTrace(send_time=10.3, end_time=10.4, success=False, error="HTTP 500")
    return [a, b, c]


def test_per_request_definitions():
    a, b, _ = _trace()
    assert a.ttft == pytest.approx(0.5) and b.ttft == pytest.approx(1.0)
    assert a.e2e == pytest.approx(1.2) and b.e2e == pytest.approx(1.5)
    assert a.itls == pytest.approx([0.1, 0.2, 0.3])
    # vLLM's TPOT: (E2E - TTFT) / (output tokens - 1)
    assert a.tpot == pytest.approx((1.2 - 0.5) / 3)
    assert b.tpot == pytest.approx((1.5 - 1.0) / 2)
    assert RequestTrace(0.0, [0.1], 0.1, output_tokens=1).tpot is None


def test_summary_of_recorded_trace():
    s = summarize(_trace(), duration_s=2.0)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["total_input_tokens"] == 150 and s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(78.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(750.0)
    assert s["ttft_ms"]["median"] == pytest.approx(750.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(500 + 0.99 * 500)  # linear interpolation between 500 and 1000
    tpots = [700 / 3, 250.0]
    assert s["tpot_ms"]["mean"] == pytest.approx(statistics.mean(tpots))
    # ITLs of all requests pooled: 100, 200, 300 (A) and 500 (B) ms
    assert s["itl_ms"]["mean"] == pytest.approx(275.0)
    assert s["itl_ms"]["median"] == pytest.approx(250.0)
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile([100, 200, 300, 500], 90))
    assert s["e2el_ms"]["mean"] == pytest.approx(1350.0)
    table = format_summary(s)
    assert "Successful requests:" in table and "Median TPOT (ms):" in table and "P99 ITL (ms):" in table


def test_summary_rejects_bad_duration_and_handles_empty():
    with pytest.raises(ValueError, match="duration_s"):
        summarize(_trace(), 0.0)
    assert math.isnan(distribution_ms([])["median"])
    s = summarize([RequestTrace(0.0, [], 1.0, success=False)], 1.0)
    assert s["completed"] == 0 and s["failed"] == 1 and math.isnan(s["ttft_ms"]["mean"])


# -- datasets --------------------------------------------------------------------------------------
POOL = list(range(256, 5000))


def test_random_dataset_fixed_lengths_seeded():
    a = ds.make_dataset("random", POOL, num_prompts=20, input_len=37, output_len=11, seed=3)
    assert len(a) == 20 and all(s.prompt_len == 37 and s.output_len == 11 for s in a)
    assert all(256 <= t < 5000 for s in a for t in s.prompt_token_ids)
    assert a == ds.make_dataset("random", POOL, num_prompts=20, input_len=37, output_len=11, seed=3)
    assert a != ds.make_dataset("random", POOL, num_prompts=20, input_len=37, output_len=11, seed=4)
    assert len({tuple(s.prompt_token_ids) for s in a}) == 20


def test_sharegpt_like_length_statistics():
    pairs = ds.sharegpt_like_lengths(5000, seed=0)
    ins, outs = [p for p, _ in pairs], [o for _, o in pairs]
    assert statistics.mean(ins) == pytest.approx(ds.SHAREGPT_MEAN_INPUT, rel=0.05)
    assert statistics.mean(outs) == pytest.approx(ds.SHAREGPT_MEAN_OUTPUT, rel=0.05)
    # log-normal: heavy right tail, so the median sits well below the mean
    assert statistics.median(ins) < 0.85 * statistics.mean(ins)
    assert min(ins) >= 4 and min(outs) >= 4 and max(ins) <= 1024 and max(p + o for p, o in pairs) <= 2048
    assert len(set(ins)) > 200  # lengths vary
    samples = ds.make_dataset("sharegpt-like", POOL, num_prompts=50, seed=1)
    assert [(s.prompt_len, s.output_len) for s in samples] == ds.sharegpt_like_lengths(50, seed=1)
    capped = ds.sharegpt_like_lengths(500, seed=0, max_total=1024)
    assert max(p + o for p, o in capped) <= 1024
    with pytest.raises(ValueError, match="max_total"):
        ds.sharegpt_like_lengths(10, max_total=256)


def test_lognormal_fit_matches_the_truncated_mean():
    mu = ds.fit_lognormal_mu(200.0, 0.9, 3.5, 1024.5)
    assert ds.truncated_lognormal_mean(mu, 0.9, 3.5, 1024.5) == pytest.approx(200.0, rel=1e-6)
    # without truncation the closed form E[X] = exp(mu + sigma^2/2) holds
    assert ds.truncated_lognormal_mean(math.log(100) - 0.18, 0.6, 1e-9, 1e9) == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(ValueError, match="mean"):
        ds.fit_lognormal_mu(2000.0, 0.9, 4, 1024)


def test_prefix_shared_dataset():
    samples = ds.make_dataset("prefix-shared", POOL, num_prompts=12, num_prefixes=3, prefix_len=40, suffix_len=5,
                              output_len=7, seed=0)
    assert all(s.prompt_len == 45 and s.output_len == 7 for s in samples)
    prefixes = [tuple(s.prompt_token_ids[:40]) for s in samples]
    assert len(set(prefixes)) == 3
    assert all(prefixes[i] == prefixes[i % 3] for i in range(12))
    assert len({tuple(s.prompt_token_ids[40:]) for s in samples}) == 12


def _byte_level_bpe():
    """A small byte-level BPE (GPT-2 / SmolLM2 style) trained here on edit-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pagellm.benchmarks.edit_like import edit_prompt

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    rng = random.Random(99)
    backend.train_from_iterator([edit_prompt(rng, len, 400)[0] for _ in range(12)], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_edit_like_dataset_is_seeded_sized_and_holds_its_block():
    from pagellm.benchmarks.edit_like import KINDS, edit_prompt
    from pagellm.benchmarks.serve import prepare_prompts

    tok = _byte_level_bpe()
    samples = ds.make_dataset("edit-like", [], num_prompts=12, input_len=200, output_len=150, seed=5, tokenizer=tok)
    assert samples == ds.make_dataset("edit-like", [], num_prompts=12, input_len=200, output_len=150, seed=5,
                                      tokenizer=tok)
    assert samples != ds.make_dataset("edit-like", [], num_prompts=12, input_len=200, output_len=150, seed=6,
                                      tokenizer=tok)
    assert all(s.output_len == 150 for s in samples)
    rng = random.Random(5)  # the dataset's own stream: the same prompts with their blocks
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = [edit_prompt(rng, count, 200) for _ in samples]
    texts = prepare_prompts(samples, "text", tok)  # what `bench serve` sends
    kinds = set()
    for (prompt, block), sample, text in zip(prompts, samples, texts):
        assert text == prompt and block in text and len(block) > 200
        assert 0.6 * 200 <= count(block) <= 1.6 * 200 and count(block) < sample.prompt_len
        kinds.add(next(k for k, head in zip(KINDS, ("Rewrite", "Fix", "In the JSON")) if text.startswith(head)))
    assert kinds == set(KINDS)
    assert 180 <= statistics.mean(count(b) for _, b in prompts) <= 220
    with pytest.raises(ValueError, match="tokenizer"):
        ds.make_dataset("edit-like", POOL, num_prompts=1)


def test_dataset_bad_values():
    with pytest.raises(ValueError, match="dataset must be one of"):
        ds.make_dataset("sharegpt", POOL, num_prompts=1)
    with pytest.raises(ValueError, match="input_len"):
        ds.make_dataset("random", POOL, num_prompts=1, input_len=0)
    with pytest.raises(ValueError, match="num_prefixes"):
        ds.make_dataset("prefix-shared", POOL, num_prompts=4, num_prefixes=0)
    with pytest.raises(ValueError, match="vocab_size"):
        ds.ordinary_token_ids(None, None)
    assert ds.ordinary_token_ids(None, 1000)[0] == 256


# -- FLOPs, arrivals, request bodies ------------------------------------------------------------------
def test_model_flops_by_hand():
    shape = ModelShape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10)
    # per layer: q 4*4 + k,v 2*4*2 + o 4*4 + mlp 3*4*8 = 16 + 16 + 16 + 96
    assert shape.layer_weights == 144
    # prompt 3, output 2: 4 positions fed; attention over 1+2+3+4 = 10 keys; LM head at 2 positions
    expected = 2 * 2 * 144 * 4 + 4 * 2 * 2 * 2 * 10 + 2 * 4 * 10 * 2
    assert shape.request_flops(3, 2) == expected
    assert shape.total_flops([(3, 2), (3, 2)]) == 2 * expected


def test_poisson_arrivals_and_rates():
    delays = arrival_delays(4000, rate=4.0, seed=0)
    assert statistics.mean(delays) == pytest.approx(0.25, rel=0.06)
    assert arrival_delays(3, math.inf) == [0.0, 0.0, 0.0]
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    for bad in ("0", "-1", "fast"):
        with pytest.raises(ValueError, match="request rate"):
            parse_rate(bad)


def test_request_bodies():
    cfg = ServeConfig(base_url="http://x/v1", model="m", endpoint="chat", extra_body={"top_k": 1})
    body = request_body(cfg, "hello", 8)
    assert body["messages"] == [{"role": "user", "content": "hello"}] and body["max_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] and body["top_k"] == 1
    body = request_body(ServeConfig(base_url="http://x/v1", model="m", prompt_format="ids", ignore_eos=False),
                        [5, 6], 3)
    assert body["prompt"] == [5, 6] and "ignore_eos" not in body
    with pytest.raises(ValueError, match="prompt_format"):
        ServeConfig(base_url="u", model="m", endpoint="chat", prompt_format="ids")
    with pytest.raises(ValueError, match="endpoint"):
        ServeConfig(base_url="u", model="m", endpoint="embeddings")
