"""The shared request intake: tokenized once, fanned out and admitted in one place, off the
event loop in AsyncLLM, and importable without the model stack."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from pagellm.config import EngineConfig
from pagellm.engine.async_llm import AsyncLLM
from pagellm.engine.core_interface import EngineCoreRequest, admit_all_or_none
from pagellm.engine.intake import fan_out
from pagellm.engine.setup import resolve_setup
from pagellm.sampling_params import SamplingParams


class _CountingTokenizer:
    """Delegates to a real tokenizer and counts how often it is asked to encode text."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_offline_text_prompts_are_tokenized_once(smollm_llm):
    processor = smollm_llm.llm_engine.processor
    counting = _CountingTokenizer(processor.tokenizer)
    processor.tokenizer = counting
    try:
        outs = smollm_llm.generate(["Hello, my name is", "The capital of France is"],
                                   SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    finally:
        processor.tokenizer = counting.inner
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    assert counting.calls == 2


def test_a_bad_prompt_in_a_batch_queues_nothing(smollm_llm):
    engine = smollm_llm.llm_engine
    with pytest.raises(ValueError, match="vocabulary"):
        smollm_llm.generate(["fine", [10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_fan_out_children_and_all_or_none_admission():
    parent = EngineCoreRequest("r", [1, 2, 3], SamplingParams(n=3, seed=7, prompt_logprobs=1))
    children = fan_out(parent)
    assert [c.request_id for c in children] == ["0_r", "1_r", "2_r"]
    assert [c.sampling_params.seed for c in children] == [7, 8, 9]
    assert [c.sampling_params.prompt_logprobs for c in children] == [1, None, None]
    assert all(c.share_prefix and c.sampling_params.n == 1 for c in children)

    queued: list[str] = []

    def add(req: EngineCoreRequest) -> str:
        if req.request_id == "2_r":
            raise ValueError("no room")
        queued.append(req.request_id)
        return req.request_id

    def abort(ids: list[str]) -> None:
        for i in ids:
            queued.remove(i)

    with pytest.raises(ValueError, match="no room"):
        admit_all_or_none(children, add, abort)
    assert queued == []
    assert admit_all_or_none(children[:2], add, abort) == ["0_r", "1_r"]


def test_front_end_modules_do_not_import_the_model_stack():
    code = ("import sys\n"
            "import pagellm.engine.processor, pagellm.engine.intake, pagellm.engine.async_llm\n"
            "import pagellm.entrypoints.openai.server\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['pagellm', 'worker'], ['pagellm', 'models'], ['pagellm', 'layers'], ['pagellm', 'attention']))\n"
            "print(bad)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


class _IdleCoreClient:
    """A core client that never answers: enough to drive the front end's intake alone."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def start_reader(self, on_message, on_exit) -> None:
        pass

    def send(self, message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


def test_a_huge_prompt_is_refused_without_blocking_the_event_loop(smollm_path):
    from pagellm.engine.intake import load_front_end_tokenizer

    setup = resolve_setup(EngineConfig(model=smollm_path, max_model_len=2048))
    client = _IdleCoreClient()
    engine = AsyncLLM(setup, load_front_end_tokenizer(setup), client)
    prompt = "hello world, " * (3_000_000 // 13)  # ~3 MB of text: seconds of tokenizing

    async def main() -> tuple[float, int]:
        refusal = asyncio.ensure_future(anext(engine.generate(prompt, SamplingParams(max_tokens=4), "huge")))
        worst, probes = 0.0, 0
        await asyncio.sleep(0.05)
        while not refusal.done():  # a /health-like coroutine on the same loop
            start = time.perf_counter()
            await asyncio.sleep(0)
            worst = max(worst, time.perf_counter() - start)
            probes += 1
            await asyncio.sleep(0.02)
        with pytest.raises(ValueError, match="max_model_len"):
            refusal.result()
        return worst, probes

    try:
        worst, probes = asyncio.run(main())
    finally:
        engine.shutdown()
    assert probes >= 3, "the refusal finished before the loop could be probed while it ran"
    assert worst < 0.1, f"the event loop stalled {worst * 1000:.0f} ms while a prompt was tokenized"
    assert client.sent == []  # refused before anything reached the core
