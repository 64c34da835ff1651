"""Hugging Face checkpoints: the transformers config, and weights from *.safetensors files."""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from pagellm.loader.gguf import check_gguf_file
from pagellm.loader.gguf_cache import cached
from pagellm.loader.lazy import LazyTensor
from pagellm.loader.source import ModelSource

_INDEX_FILE = "model.safetensors.index.json"


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The transformers config of the model; for GGUF, transformers builds it from the file's metadata.

    Multimodal checkpoints come back as their wrapper config (with a `text_config`); callers pick.
    """
    if source.kind == "gguf":
        assert source.gguf_path is not None
        # transformers' own errors on a damaged file are parser internals; ours name the file.
        check_gguf_file(source.gguf_path)
        # A copy: callers may adjust their config, the cached one must stay as the file says.
        return copy.deepcopy(_gguf_config(*file_identity(source.gguf_path)))
    legacy = _legacy_su_rope_config(source.path)
    if legacy is not None:
        return legacy
    try:
        return AutoConfig.from_pretrained(source.path, local_files_only=True)
    except OSError as exc:  # transformers reports an unreadable config.json as OSError
        raise ValueError(f"could not read the config.json of {source.path}: {exc}") from exc


def file_identity(path: str) -> tuple[str, int, int]:
    """(absolute path, mtime in ns, size): a key that changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int, size: int) -> PretrainedConfig:
    """The config transformers builds from a GGUF file's metadata, parsed once per file per process.

    The parse walks every metadata array with gguf-py (about 13 s for Gemma 3's 262k-entry
    vocabulary on a small CPU), and both the engine set-up and the tokenizer need the config;
    other processes read it from the on-disk cache (`gguf_cache`).
    `mtime_ns` and `size` only key the cache (a rewritten file is parsed again).
    """
    directory, name = os.path.split(path)
    return cached((path, mtime_ns, size), "config",
                  lambda: AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True),
                  lambda entry, _: _named(AutoConfig.from_pretrained(entry, local_files_only=True), directory))


def _named(config: PretrainedConfig, name_or_path: str) -> PretrainedConfig:
    config._name_or_path = name_or_path  # where transformers' own build says it came from, not the cache
    return config


def _legacy_su_rope_config(directory: str) -> PretrainedConfig | None:
    """Older Phi-3 configs call LongRoPE "su"; transformers validates them before renaming it
    and fails, so rename it first. None for every other config (AutoConfig reads those)."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    rope = raw.get("rope_scaling") if isinstance(raw, dict) else None
    if not isinstance(rope, dict) or "su" not in (rope.get("type"), rope.get("rope_type")) or "model_type" not in raw:
        return None
    raw["rope_scaling"] = {**rope, "type": "longrope", "rope_type": "longrope"}
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def safetensors_files(directory: str) -> list[str]:
    """The weight files of an HF directory: those the shard index lists, else every *.safetensors."""
    index_path = os.path.join(directory, _INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' listing the weight shards")
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index_path} lists weight shards that are missing from {directory}: {missing}")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weight files in {directory}")
    return files


def iter_safetensors_weights(directory: str, dtype: torch.dtype, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in `dtype`) one tensor at a time, so peak memory stays at one tensor.

    lazy=True yields `LazyTensor`s instead (valid until the next one is asked for): a
    tensor-parallel rank then reads only its rows / columns of each tensor from the file.
    The weight files are listed here, so a missing shard fails at the call, not midway through loading.
    """
    return _tensors(safetensors_files(directory), dtype, lazy)


def _tensors(paths: list[str], dtype: torch.dtype, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    for path in paths:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as exc:  # safetensors raises its own error type for damaged headers
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
        with handle as f:
            for name in f.keys():
                yield name, LazyTensor(f, name, dtype) if lazy else f.get_tensor(name).to(dtype)
