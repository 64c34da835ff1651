"""A server subprocess on a free loopback port: start, wait until healthy, stop with SIGTERM.

By default it runs `pagellm serve ARGS`; `command` runs any other OpenAI-compatible server
(llama.cpp's, for the peer benchmarks), with `{port}` in it replaced by the chosen port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pagellm.entrypoints.cli serve ARGS` on 127.0.0.1:<free port>, as a context manager."""

    def __init__(self, args: Sequence[str] = (), env: Optional[dict[str, str]] = None, port: Optional[int] = None,
                 command: Optional[Sequence[str]] = None, health_path: str = "/health") -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.env = env
        self.command = list(command) if command is not None else None
        self.health_path = health_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="pagellm-serve-", suffix=".log", delete=False)

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        return self.launch().wait_ready(timeout)

    def argv(self) -> list[str]:
        if self.command is not None:
            return [part.replace("{port}", str(self.port)) for part in self.command] + self.args
        return [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--host", "127.0.0.1",
                "--port", str(self.port), *self.args]

    def launch(self) -> "ServerProcess":
        """Starts the process and returns at once (the model loads in the background)."""
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        """Blocks until GET <health_path> answers 200."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if httpx.get(self.url + self.health_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status (killed after `timeout`: -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-20000:]

    def close(self) -> None:
        """Stops the server if it runs and deletes its log."""
        self.stop()
        self._log.close()
        if os.path.exists(self._log.name):
            os.unlink(self._log.name)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
