"""`pagellm chat`: driven through a pseudo-terminal, like a user would, and its command loop on its own."""

from __future__ import annotations

import io
import os
import sys

import pexpect
import pytest

from pagellm import SamplingParams
from pagellm.entrypoints.chat_cli import ANSWER, PROMPT, run_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _answer(child: pexpect.spawn) -> str:
    """The streamed answer: everything between "assistant> " and the next "you> " prompt."""
    child.expect_exact(ANSWER)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").strip()


@pytest.fixture
def chat_process():
    """`pagellm chat` on the default model; it starts loading before the reference engine does."""
    child = pexpect.spawn(sys.executable, ["-m", "pagellm.entrypoints.cli", "chat", "--max-tokens", "16",
                                           "--temperature", "0", "--max-model-len", "1024",
                                           "--kv-cache-memory", str(64 << 20)],
                          timeout=120, encoding="utf-8", cwd=REPO)
    yield child
    child.close(force=True)


def test_chat_through_a_terminal_keeps_history_and_exits_cleanly(chat_process, smollm_llm):
    child = chat_process
    child.expect_exact(PROMPT)
    first_q, second_q = "What is the capital of France?", "And of Germany?"
    child.sendline(first_q)
    first = _answer(child)
    child.sendline(second_q)
    second = _answer(child)
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None

    # The same turns through LLM.chat (greedy, same template): the terminal saw exactly that text,
    # and the second answer was generated with the first exchange in its context.
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    conversation = [{"role": "user", "content": first_q}]
    ref_first = smollm_llm.chat(conversation, greedy, use_tqdm=False)[0].outputs[0].text
    conversation += [{"role": "assistant", "content": ref_first}, {"role": "user", "content": second_q}]
    ref_second = smollm_llm.chat(conversation, greedy, use_tqdm=False)[0].outputs[0].text
    assert first == ref_first.strip()
    assert second == ref_second.strip()
    assert first and second


class _FakeSession:
    """Stands in for ChatSession: echoes the question back in two deltas."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def ask(self, text, on_delta):
        if text == "too long":
            raise ValueError("the prompt is 2000 tokens long, more than max_model_len (1024)")
        self.asked.append(text)
        on_delta("echo: ")
        on_delta(text)
        return "echo: " + text


def test_command_loop_handles_commands_errors_and_eof():
    session = _FakeSession()
    out = io.StringIO()
    code = run_chat(session, stdin=io.StringIO("hello\n\n/reset\n/nope\ntoo long\nstill here\n"), stdout=out)
    text = out.getvalue()
    assert code == 0  # Ctrl-D / end of input leaves cleanly
    assert session.asked == ["hello", "still here"]
    assert session.resets == 1
    assert f"{ANSWER}echo: hello\n" in text and f"{ANSWER}echo: still here\n" in text
    assert "(conversation cleared)" in text
    assert "unknown command '/nope'" in text
    assert "max_model_len" in text  # the error is shown and the chat goes on


def test_exit_command_stops_reading():
    session = _FakeSession()
    code = run_chat(session, stdin=io.StringIO("/exit\nhello\n"), stdout=io.StringIO())
    assert code == 0 and session.asked == []
