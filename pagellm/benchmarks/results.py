"""Benchmark result files: one JSON per run with its config, the environment and the numbers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Optional

_PACKAGES = ("pagellm", "torch", "transformers", "tokenizers", "numpy", "httpx", "gguf")


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """What the numbers depend on: machine, thread count, versions."""
    env = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "versions": {name: _version(name) for name in _PACKAGES},
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return env


def write_result(result_dir: Optional[str], kind: str, config: dict, numbers: dict,
                 name: Optional[str] = None) -> Optional[str]:
    """Writes {kind, config, environment, results} to RESULT_DIR/<kind>-<timestamp>[-name].json.
    Returns the path (None when result_dir is None)."""
    if result_dir is None:
        return None
    os.makedirs(result_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{kind}-{stamp}" + (f"-{name}" if name else "")
    path = os.path.join(result_dir, base + ".json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(result_dir, f"{base}-{n}.json")
    payload = {"kind": kind, "config": config, "environment": environment(), "results": numbers}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
    return path
