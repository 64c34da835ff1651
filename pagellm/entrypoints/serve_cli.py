"""`pagellm serve`: the OpenAI-compatible server. Flags follow vLLM's names."""

from __future__ import annotations

import argparse

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20  # same defaults as the server's ServerOptions
DEFAULT_BODY_READ_TIMEOUT_S = 30.0


def _host_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a PEFT adapter directory), got {text!r}")
    return name, path


def register(sub) -> None:
    from pagellm.entrypoints.cli import add_engine_args

    parser = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /metrics, ...). Stop with Ctrl-C or SIGTERM.")
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients send and responses report (default: the MODEL argument, or "
                             "the default model's file name)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route except /health and /metrics; "
                             "prefer $PAGELLM_API_KEY, which other users cannot read in `ps` (default: "
                             "$PAGELLM_API_KEY; none: no key needed)")
    parser.add_argument("--metrics-require-api-key", action="store_true",
                        help="also require the API key on /metrics (default: /metrics is open to scrapers)")
    parser.add_argument("--allowed-hosts", type=_host_list, default=None, metavar="HOST[,HOST...]",
                        help="Host header names to answer ('*': any). Default: a loopback --host answers "
                             "only localhost, 127.0.0.1 and [::1] (against DNS rebinding); other binds answer any")
    parser.add_argument("--allowed-origins", type=_host_list, default=None, metavar="ORIGIN[,ORIGIN...]",
                        help="CORS: browser origins allowed to call the API ('*': any). Default: no CORS")
    parser.add_argument("--forwarded-allow-ips", type=_host_list, default=None, metavar="IP[,IP...]",
                        help="proxies whose X-Forwarded-For / X-Forwarded-Proto headers are believed "
                             "(default: none, the client address is the socket's)")
    parser.add_argument("--body-read-timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT_S, metavar="S",
                        help="a request body not fully received S seconds after its headers gets 408 and the "
                             "connection is closed (default: 30)")
    parser.add_argument("--header-read-timeout", type=float, default=DEFAULT_BODY_READ_TIMEOUT_S, metavar="S",
                        help="a request whose headers are not complete S seconds after its first byte (or "
                             "after the connection opened) gets 408 and the connection is closed (default: 30)")
    parser.add_argument("--timeout-keep-alive", type=int, default=5, metavar="S",
                        help="close idle keep-alive connections after S seconds (default: 5)")
    parser.add_argument("--max-prompt-chars", type=int, default=None,
                        help="longest text prompt (or conversation) in characters, checked before tokenizing "
                             "(default: 32 x max-model-len)")
    parser.add_argument("--max-chat-messages", type=int, default=None,
                        help="most messages in one chat request (default: max-model-len)")
    parser.add_argument("--max-prompts-per-request", type=int, default=None,
                        help="most prompts in one /v1/completions request (default: 256)")
    parser.add_argument("--prompt-logprobs-budget", type=int, default=None,
                        help="most prompt tokens x (logprobs + 1) one echo / prompt_logprobs request may ask "
                             "for; over it: 400 (default: 131072)")
    parser.add_argument("--max-waiting-requests", type=int, default=None, metavar="N",
                        help="sequences (n counts each sample) that may wait beyond a full batch; past it "
                             "requests get 429 with Retry-After (default: max(256, 2 x max-num-seqs); -1: no limit)")
    parser.add_argument("--max-n", type=int, default=None,
                        help="most samples (n) per prompt; larger n gets 400 (default and maximum: 128)")
    parser.add_argument("--request-timeout", type=float, default=None, metavar="S",
                        help="abort a request S seconds after it arrived (504; everything it held is freed) "
                             "(default: no deadline)")
    parser.add_argument("--restart-engine-on-failure", action="store_true",
                        help="restart a dead engine core in place (in-flight requests fail, new ones are served "
                             "once it has reloaded). Default: the server exits with status 1, for a supervisor "
                             "to restart it")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let chat requests with tools use tool_choice "auto" (needs --tool-call-parser)')
    parser.add_argument("--tool-call-parser", default=None, metavar="NAME",
                        help="how tool calls are found in the model's text: hermes, llama3_json, mistral, pythonic, "
                             "or module:Class (default: none)")
    parser.add_argument("--reasoning-parser", default=None, metavar="NAME",
                        help="split <think> reasoning into reasoning_content: deepseek_r1, qwen3, or module:Class "
                             "(default: none)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja2 chat template file (default: the tokenizer's own template)")
    parser.add_argument("--engine-in-process", action="store_true",
                        help="run the engine core in a thread of the server process instead of its own process")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                        help="larger request bodies get 413 (default: 16 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds to let in-flight requests finish after SIGINT/SIGTERM before they are aborted (default: 10)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level (default: info)")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request")
    parser.add_argument("--lora-modules", type=_lora_module, nargs="+", default=None, metavar="NAME=PATH",
                        help="LoRA adapters served under their names (needs --enable-lora); more can be loaded "
                             "at run time with POST /v1/load_lora_adapter")
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be positive, got {args.max_request_body_bytes}")
    if not args.body_read_timeout > 0 or not args.header_read_timeout > 0 or args.timeout_keep_alive < 1:
        raise ValueError("--header-read-timeout, --body-read-timeout and --timeout-keep-alive must be positive")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be positive, got {args.request_timeout}")
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    if args.max_n is not None and not 1 <= args.max_n <= 128:
        raise ValueError(f"--max-n must be in [1, 128], got {args.max_n}")
    for flag in ("max_prompt_chars", "max_chat_messages", "max_prompts_per_request", "prompt_logprobs_budget"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    from pagellm.entrypoints.openai.server import ServerOptions, chat_parsers, run_server

    # Before the model loads: a typo in a parser name should not cost a start-up.
    chat_parsers(ServerOptions(tool_call_parser=args.tool_call_parser,
                               enable_auto_tool_choice=args.enable_auto_tool_choice,
                               reasoning_parser=args.reasoning_parser))
    return run_server(args)
