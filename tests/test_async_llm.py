"""AsyncLLM: streaming parity with LLM.generate, concurrency, aborts that free the KV cache,
bad input, metrics and the engine core's lifecycle, with the core in a child process and in a thread."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagellm import SamplingParams
from pagellm.config import EngineConfig
from pagellm.engine.async_llm import AsyncLLM

from conftest import make_tiny_llama

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time"]
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module", params=["process", "thread"])
def engine(request):
    eng = AsyncLLM.from_config(EngineConfig(max_model_len=1024, kv_cache_memory=64 << 20),
                               engine_process=request.param == "process", quiet=True)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(smollm_llm):
    """LLM.generate greedy texts (and token ids) per prompt, computed once."""
    outs = smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return {p: (o.outputs[0].text, o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


async def collect(engine, prompt, params, request_id):
    """(list of deltas, concatenated text, concatenated token ids, final output) of one stream."""
    deltas, text, ids, last = [], "", [], None
    async for out in engine.generate(prompt, params, request_id):
        assert out.request_id == request_id
        deltas.append(out)
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        last = out
    return deltas, text, ids, last


async def wait_idle(engine, timeout: float = 15.0):
    """Polls fresh core snapshots until nothing runs, waits or holds KV blocks."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await engine.wait_for_stats()
        if (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0):
            return stats
        assert time.monotonic() < deadline, f"engine did not go idle: {stats}"
        await asyncio.sleep(0.05)


def test_streamed_deltas_match_llm_generate(engine, reference):
    async def main():
        return await collect(engine, PROMPTS[0], GREEDY, "parity")

    deltas, text, ids, last = asyncio.run(main())
    ref_text, ref_ids = reference[PROMPTS[0]]
    assert text == ref_text
    assert ids == list(ref_ids)
    assert len(deltas) > 1, "expected the output to arrive in several deltas"
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert all(not d.finished for d in deltas[:-1])
    assert last.prompt_token_ids and last.prompt == PROMPTS[0]


def test_sixteen_concurrent_requests(engine, reference):
    async def main():
        jobs = [collect(engine, PROMPTS[i % len(PROMPTS)], GREEDY, f"conc-{i}") for i in range(16)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for i, (_, text, ids, last) in enumerate(results):
        assert last.finished
        assert (text, ids) == (reference[PROMPTS[i % len(PROMPTS)]][0], list(reference[PROMPTS[i % len(PROMPTS)]][1])), i
    assert asyncio.run(wait_idle(engine)).num_running == 0


def test_parallel_sampling_streams_indexed_completions(engine, reference):
    async def main():
        params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_TOKENS)
        texts = {0: "", 1: ""}
        finish = {}
        async for out in engine.generate(PROMPTS[1], params, "n2"):
            for c in out.outputs:
                texts[c.index] += c.text
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        return texts, finish

    texts, finish = asyncio.run(main())
    assert texts == {0: reference[PROMPTS[1]][0], 1: reference[PROMPTS[1]][0]}
    assert finish == {0: "length", 1: "length"}


def test_stop_string_found_in_front_end_finishes_the_request(engine, reference):
    ref_text = reference[PROMPTS[0]][0]
    words = ref_text.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer

    async def main():
        _, text, _, last = await collect(engine, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=200,
                                                                             ignore_eos=True, stop=[stop]), "stop")
        return text, last, await wait_idle(engine)

    text, last, _ = asyncio.run(main())
    assert text == ref_text[:ref_text.index(stop)]
    assert (last.outputs[0].finish_reason, last.outputs[0].stop_reason) == ("stop", stop)


def test_leaving_a_stream_early_aborts_and_frees_kv(engine):
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main():
        # 1) the consumer closes the iterator after a few deltas
        stream = engine.generate(PROMPTS[2], long, "closed-early")
        for _ in range(3):
            await anext(stream)
        busy = await engine.wait_for_stats()
        assert busy.num_running == 1 and busy.kv_cache_usage > 0
        await stream.aclose()
        await wait_idle(engine)

        # 2) the consuming task is cancelled while it waits for output
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPTS[3], long, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)

        # 3) abort() from outside: the stream ends with finish_reason "abort"
        outputs = []

        async def consume_all():
            async for out in engine.generate(PROMPTS[3], long, "aborted"):
                outputs.append(out)

        task = asyncio.create_task(consume_all())
        while not outputs:
            await asyncio.sleep(0.01)
        await engine.abort("aborted")
        await asyncio.wait_for(task, 30)
        await wait_idle(engine)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert not engine.output_processor.requests  # the front end forgot them too


def test_bad_input_raises_value_error_and_engine_keeps_serving(engine, reference):
    async def first(prompt, params, request_id):
        stream = engine.generate(prompt, params, request_id)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def main():
        vocab = engine.model_config.vocab_size
        cases = [
            ("", GREEDY, "the prompt is empty"),
            ([1, 2, vocab + 5], GREEDY, "outside the vocabulary"),
            (list(range(100, 1200)), GREEDY, "max_model_len"),
            (PROMPTS[0], "not params", "SamplingParams"),
        ]
        for prompt, params, message in cases:
            with pytest.raises(ValueError, match=message):
                await first(prompt, params, "bad")
        # a request id that is in use
        busy = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "dup")
        await anext(busy)
        with pytest.raises(ValueError, match="already in use"):
            await first(PROMPTS[1], GREEDY, "dup")
        await busy.aclose()
        await wait_idle(engine)
        return await collect(engine, PROMPTS[0], GREEDY, "after-bad")

    _, text, _, _ = asyncio.run(main())
    assert text == reference[PROMPTS[0]][0]
    assert not engine.output_processor.requests


# What the engine core reports carries its data-parallel rank as an `engine` label ("0" here).
_CORE_METRICS = {"pagellm:num_requests_running", "pagellm:num_requests_waiting", "pagellm:kv_cache_usage_perc",
                 "pagellm:num_preemptions_total", "pagellm:prefix_cache_queries_total", "pagellm:prefix_cache_hits_total"}


def _labels(name: str, model_name: str, extra=()) -> tuple:
    engine = (("engine", "0"),) if name in _CORE_METRICS else ()
    return tuple(sorted((("model_name", model_name),) + engine + tuple(extra)))


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_requests(engine):
    asyncio.run(wait_idle(engine))
    before = _samples(engine.metrics.render().decode())

    async def aborted_after_first_delta():
        stream = engine.generate(PROMPTS[3], SamplingParams(max_tokens=500, ignore_eos=True), "metrics-abort")
        await anext(stream)
        await stream.aclose()

    async def main():
        jobs = [collect(engine, p, GREEDY, f"metrics-{i}") for i, p in enumerate(PROMPTS[:3])]
        await asyncio.gather(aborted_after_first_delta(), *jobs)
        await wait_idle(engine)

    asyncio.run(main())
    text = engine.metrics.render().decode()
    after = _samples(text)

    def value(name, extra=()):
        return after[(name, _labels(name, engine.metrics.model_name, extra))]

    def delta(name, extra=()):
        key = (name, _labels(name, engine.metrics.model_name, extra))
        return after[key] - before.get(key, 0.0)

    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert f"pagellm:{name}" in text
    assert value("pagellm:num_requests_running") == 0
    assert value("pagellm:num_requests_waiting") == 0
    assert value("pagellm:kv_cache_usage_perc") == 0
    assert value("pagellm:num_preemptions_total") == 0  # 64 MiB holds these four easily
    # Three requests ran to MAX_TOKENS, one was aborted after its first token.
    assert delta("pagellm:request_success_total", (("finished_reason", "length"),)) == 3
    assert delta("pagellm:request_success_total", (("finished_reason", "abort"),)) == 1
    num_prompt = sum(len(engine.tokenizer(p).input_ids) for p in PROMPTS)
    assert delta("pagellm:prompt_tokens_total") == num_prompt
    assert 3 * MAX_TOKENS + 1 <= delta("pagellm:generation_tokens_total") <= 3 * MAX_TOKENS + 500
    assert delta("pagellm:time_to_first_token_seconds_count") == 4
    assert delta("pagellm:e2e_request_latency_seconds_count") == 3  # aborted requests are only counted
    assert delta("pagellm:request_queue_time_seconds_count") == 3
    assert delta("pagellm:inter_token_latency_seconds_count") >= 3 * (MAX_TOKENS - 1)
    ttft_mean = delta("pagellm:time_to_first_token_seconds_sum") / 4
    e2e_mean = delta("pagellm:e2e_request_latency_seconds_sum") / 3
    queue_mean = delta("pagellm:request_queue_time_seconds_sum") / 3
    assert 0 < ttft_mean < e2e_mean < 600
    assert 0 <= queue_mean < e2e_mean


def test_prefix_cache_hits_metrics_and_reset(engine):
    """Cached-token counts reach the final output, the counters move, and reset goes over the pipe."""
    prompt = "Prefix caching test: the quick brown fox jumps over the lazy dog, twice over. " * 2
    num_prompt = len(engine.tokenizer(prompt).input_ids)
    cached = (num_prompt - 1) // engine.config.block_size * engine.config.block_size
    params = SamplingParams(temperature=0.0, max_tokens=2)

    async def main():
        await wait_idle(engine)
        assert await engine.reset_prefix_cache() is True
        before = _samples(engine.metrics.render().decode())
        first = (await collect(engine, prompt, params, "pc-1"))[3]
        second = (await collect(engine, prompt, params, "pc-2"))[3]
        # Refused while a request holds KV blocks.
        stream = engine.generate(prompt, SamplingParams(max_tokens=500, ignore_eos=True), "pc-busy")
        await anext(stream)
        assert await engine.reset_prefix_cache() is False
        await stream.aclose()
        await wait_idle(engine)
        after = _samples(engine.metrics.render().decode())
        assert await engine.reset_prefix_cache() is True
        third = (await collect(engine, prompt, params, "pc-3"))[3]
        return first, second, third, before, after

    first, second, third, before, after = asyncio.run(main())
    assert cached >= 16
    assert (first.num_cached_tokens, second.num_cached_tokens, third.num_cached_tokens) == (0, cached, 0)
    assert second.outputs[0].finish_reason == "length"
    def delta(name):
        key = (name, _labels(name, engine.metrics.model_name))
        return after[key] - before.get(key, 0.0)

    assert delta("pagellm:prefix_cache_queries_total") == 3 * num_prompt
    assert delta("pagellm:prefix_cache_hits_total") == 2 * cached  # the second and the aborted one


def test_shutdown_ends_streams_and_joins_the_core(engine):
    async def main():
        outputs = []

        async def consume():
            async for out in engine.generate(PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True), "last"):
                outputs.append(out)

        task = asyncio.create_task(consume())
        while not outputs:
            await asyncio.sleep(0.01)
        engine.shutdown()
        await asyncio.wait_for(task, 10)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].finish_reason == "abort"
    assert multiprocessing.active_children() == []
    assert not any(t.name == "pagellm-engine-core" and t.is_alive() for t in threading.enumerate())
    assert not engine.errored
    engine.shutdown()  # idempotent

    async def after():
        async for _ in engine.generate(PROMPTS[0], GREEDY, "too-late"):
            pass

    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(after())


# -- the core process's lifecycle, on a tiny random model ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


def _tiny_config(path: str) -> EngineConfig:
    return EngineConfig(model=path, skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=1 << 20)


def test_core_death_fails_requests_with_runtime_error(tiny_model):
    before = set(multiprocessing.active_children())
    engine = AsyncLLM.from_config(_tiny_config(tiny_model), quiet=True)
    try:
        (child,) = set(multiprocessing.active_children()) - before

        async def main():
            stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "victim")
            await anext(stream)
            child.kill()
            with pytest.raises(RuntimeError, match="engine core died"):
                async for _ in stream:
                    pass
            with pytest.raises(RuntimeError, match="engine core died"):
                await anext(engine.generate([5, 6, 7], GREEDY, "after-death"))

        asyncio.run(main())
        assert engine.errored
    finally:
        engine.shutdown()
    assert child not in multiprocessing.active_children()


def test_load_failure_in_the_core_process_raises_its_message(tiny_model, tmp_path):
    import shutil

    import torch
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    save_file({"model.not_a_layer.weight": torch.zeros(2)}, str(broken / "model.safetensors"))
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="not_a_layer"):
        AsyncLLM.from_config(_tiny_config(str(broken)), quiet=True)
    assert set(multiprocessing.active_children()) <= before


_ORPHAN_SCRIPT = """
import multiprocessing, os, sys
from pagellm.config import EngineConfig
from pagellm.engine.async_llm import AsyncLLM
if __name__ == "__main__":
    AsyncLLM.from_config(EngineConfig(model=sys.argv[1], skip_tokenizer_init=True, max_model_len=256,
                                      kv_cache_memory=1 << 20), quiet=True)
    print(multiprocessing.active_children()[0].pid, flush=True)
    os._exit(0)  # no clean-up: the core must notice on its own
"""


def test_core_process_exits_when_the_front_end_dies(tiny_model):
    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT, tiny_model], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 15
    while _is_alive(pid):
        assert time.monotonic() < deadline, "the engine core outlived its front end"
        time.sleep(0.1)


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_merge_deltas_joins_what_a_slow_consumer_missed():
    from pagellm.engine.async_llm import merge_deltas
    from pagellm.outputs import CompletionOutput, Logprob, RequestOutput

    def out(completions, finished=False, prompt_logprobs=None):
        return RequestOutput("r", "p", [1, 2], completions, finished, prompt_logprobs)

    lp = lambda t: {t: Logprob(-0.5, 1, None)}  # noqa: E731
    merged = merge_deltas([
        out([CompletionOutput(1, "a", [10], -0.5, [lp(10)]), CompletionOutput(0, "x", [20], -0.5, [lp(20)])],
            prompt_logprobs=[None, lp(2)]),
        out([CompletionOutput(1, "b", [11], -1.0, [lp(11)])]),
        out([CompletionOutput(0, "y", [21], -1.0, [lp(21)], "length"),
             CompletionOutput(1, "c", [12], -1.5, [lp(12)], "stop", "c")], finished=True),
    ])
    assert merged.finished and merged.prompt_logprobs == [None, lp(2)]
    assert [c.index for c in merged.outputs] == [0, 1]
    zero, one = merged.outputs
    assert (zero.text, zero.token_ids, zero.cumulative_logprob, zero.finish_reason) == ("xy", [20, 21], -1.0, "length")
    assert (one.text, one.token_ids, one.finish_reason, one.stop_reason) == ("abc", [10, 11, 12], "stop", "c")
    assert one.logprobs == [lp(10), lp(11), lp(12)]
