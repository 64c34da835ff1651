"""`pagellm chat`: an interactive terminal chat against an in-process engine.

The conversation is kept and re-rendered with the model's chat template every turn
(prefix caching makes the repeated history cheap); the answer streams as it is generated.
Commands: /exit (or Ctrl-D) leaves, /reset forgets the conversation.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, Optional, TextIO

from pagellm.entrypoints.chat_utils import render_chat

PROMPT = "you> "
ANSWER = "assistant> "
HELP = "commands: /exit (or Ctrl-D) to leave, /reset to start a new conversation"


class ChatSession:
    """One conversation with a sync LLMEngine: history, template, one streamed answer at a time."""

    def __init__(self, engine, params, system: Optional[str] = None, chat_template: Optional[str] = None) -> None:
        if engine.get_tokenizer() is None:
            raise ValueError("pagellm chat needs a tokenizer; do not pass --skip-tokenizer-init")
        self.engine = engine
        self.params = params
        self.system = system
        self.chat_template = chat_template
        self.messages: list[dict] = []
        self._ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_delta: Callable[[str], None]) -> str:
        """Sends one user turn; streams the answer through `on_delta`; returns it (kept in the history).

        A bad turn (e.g. the conversation no longer fits max_model_len) raises ValueError and is
        not kept. On Ctrl-C the request is aborted and the partial answer is kept.
        """
        from pagellm.engine.output_processor import OutputKind

        tokenizer = self.engine.get_tokenizer()
        conversation = self.messages + [{"role": "user", "content": text}]
        rendered = render_chat(tokenizer, conversation, chat_template=self.chat_template)
        # The template writes the special tokens itself; the tokenizer must not add a second BOS.
        prompt = {"prompt": rendered, "prompt_token_ids": tokenizer(rendered, add_special_tokens=False).input_ids}
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, self.params, kind=OutputKind.DELTA)
        answer = ""
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    delta = out.outputs[0].text
                    if delta:
                        answer += delta
                        on_delta(delta)
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            raise
        finally:
            self.messages = conversation + [{"role": "assistant", "content": answer}]
        return answer


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    def read() -> Optional[str]:
        if stdin is sys.stdin and stdout is sys.stdout:
            return input(PROMPT)  # line editing when a terminal is attached
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    print(HELP, file=stdout, flush=True)
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            print(file=stdout, flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {HELP}", file=stdout, flush=True)
            continue
        stdout.write(ANSWER)
        stdout.flush()
        try:
            session.ask(text, on_delta=lambda d: (stdout.write(d), stdout.flush()))
        except KeyboardInterrupt:
            print("\n(interrupted)", file=stdout, flush=True)
            continue
        except ValueError as e:
            print(f"\n(error: {e}; try /reset)", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from pagellm.config import EngineConfig
    from pagellm.engine.llm_engine import LLMEngine
    from pagellm.entrypoints.cli import engine_kwargs
    from pagellm.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    session = ChatSession(engine, params, system=args.system, chat_template=chat_template)
    return run_chat(session)


def register(sub) -> None:
    from pagellm.entrypoints.cli import add_engine_args

    parser = sub.add_parser("chat", help="interactive chat in the terminal (engine in this process)",
                            description=f"Chat with a model in the terminal; answers stream as they are generated. "
                                        f"{HELP}.")
    add_engine_args(parser)
    parser.add_argument("--system", default=None, help="system prompt that opens the conversation")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default: 0.95)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file (default: the tokenizer's own)")
    parser.set_defaults(func=cmd_chat)
