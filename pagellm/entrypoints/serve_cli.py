"""`pagellm serve`: the OpenAI-compatible server. Flags follow vLLM's names."""

from __future__ import annotations

import argparse

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20  # same default as the server's build_app


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
                        help="require 'Authorization: Bearer KEY' on every route except /health and /metrics "
                             "(default: $PAGELLM_API_KEY; none: no key needed)")
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
    parser.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be positive, got {args.max_request_body_bytes}")
    from pagellm.entrypoints.openai.server import run_server

    return run_server(args)
