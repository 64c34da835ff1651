"""Start a peer's OpenAI-compatible server on the same GGUF, for `pagellm bench serve` to drive.

    python -m pagellm.benchmarks.peers llama-cpp-python --port 8081 --threads 2
    python -m pagellm.benchmarks.peers llama-server --port 8081 --threads 2 --parallel 16

`llama-cpp-python` runs `python -m llama_cpp.server` (installed by `make bench-peers`; it
serves one request at a time). `llama-server` runs llama.cpp's own server binary from PATH
(continuous batching over `--parallel` slots). Both get `--threads` (default: all cores) and a
context large enough for `--parallel` sequences of `--ctx-per-seq` tokens. The served model
name is `--alias` (default: smollm2). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from typing import Optional

from pagellm.benchmarks.server_process import ServerProcess

IMPLS = ("llama-cpp-python", "llama-server")


def peer_command(impl: str, model: str, threads: int, alias: str, ctx_per_seq: int = 2048, parallel: int = 1,
                 python: str = sys.executable) -> tuple[list[str], str]:
    """(argv with a `{port}` placeholder, health path) of the peer server."""
    if impl == "llama-cpp-python":
        return ([python, "-m", "llama_cpp.server", "--model", model, "--model_alias", alias,
                 "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx_per_seq),
                 # By default a new request interrupts the one being streamed: queue them instead.
                 "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", "{port}"], "/v1/models")
    if impl == "llama-server":
        binary = shutil.which("llama-server")
        if binary is None:
            raise ValueError("llama-server is not on PATH; build llama.cpp or use the llama-cpp-python peer")
        return ([binary, "-m", model, "--alias", alias, "-t", str(threads), "-tb", str(threads),
                 "-c", str(ctx_per_seq * parallel), "-np", str(parallel), "--cont-batching",
                 "--host", "127.0.0.1", "--port", "{port}"], "/health")
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("impl", choices=IMPLS)
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--alias", default="smollm2")
    parser.add_argument("--ctx-per-seq", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=1, help="llama-server slots")
    parser.add_argument("--python", default=sys.executable, help="interpreter that has llama_cpp installed")
    args = parser.parse_args(argv)
    from pagellm.loader import default_model_path

    command, health = peer_command(args.impl, args.model or default_model_path(), args.threads, args.alias,
                                   args.ctx_per_seq, args.parallel, args.python)
    server = ServerProcess(command=command, health_path=health, port=args.port)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the peer too, as Ctrl-C does
    server.start()
    print(f"{args.impl} serving {args.alias!r} at {server.base_url} ({args.threads} threads); Ctrl-C stops it",
          flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
