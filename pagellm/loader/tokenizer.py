"""Tokenizers for HF directories and GGUF files, through transformers' AutoTokenizer."""

from __future__ import annotations

import copy
import functools
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagellm.loader.gguf import read_gguf_header
from pagellm.loader.gguf_cache import cached
from pagellm.loader.hf import file_identity, load_hf_config
from pagellm.loader.source import ModelSource

# Any of these means the directory ships a tokenizer; without one, transformers fails with an
# error about sentencepiece/tiktoken that hides the real problem.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_HINT = "pass skip_tokenizer_init=True to run without a tokenizer (token ids in, token ids out)"


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer; ValueError (suggesting skip_tokenizer_init=True) when it has none."""
    if source.kind == "gguf":
        assert source.gguf_path is not None
        header = read_gguf_header(source.gguf_path)
        if "tokenizer.ggml.model" not in header.metadata or "tokenizer.ggml.tokens" not in header.array_lengths:
            raise ValueError(f"GGUF file {source.gguf_path} has no tokenizer in its metadata; {_HINT}")
        directory, name = os.path.split(source.gguf_path)
        kwargs = {"gguf_file": name}
        tokenizer_type = _gguf_tokenizer_type(source)
        if tokenizer_type is not None:
            kwargs["tokenizer_type"] = tokenizer_type
        where = source.gguf_path
    else:
        directory = source.path
        if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
            raise ValueError(
                f"model directory {directory} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
                f"{_HINT}"
            )
        kwargs = {}
        where = directory
    try:
        if source.kind == "gguf":
            # A copy: callers may add tokens or change settings; the cached one stays as the file says.
            return copy.deepcopy(_gguf_tokenizer(*file_identity(source.gguf_path), kwargs.get("tokenizer_type"),
                                                 trust_remote_code))
        return AutoTokenizer.from_pretrained(
            directory, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load the tokenizer of {where}: {exc}; {_HINT}") from exc


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime_ns: int, size: int, tokenizer_type: str | None,
                    trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """AutoTokenizer's build from a GGUF file, once per file per process.

    transformers converts the vocabulary by walking the file's metadata with gguf-py (seconds for
    SmolLM2's 49k tokens, more for Gemma 3's 262k), and each engine built in one process (the
    offline LLM, the server's front end, tests) needs it; a copy of the result costs ~0.1 s. Other
    processes read the converted tokenizer from the on-disk cache (`gguf_cache`).
    `mtime_ns` and `size` only key the cache (a rewritten file is converted again).
    """
    directory, name = os.path.split(path)
    kwargs = {"gguf_file": name} if tokenizer_type is None else {"gguf_file": name, "tokenizer_type": tokenizer_type}
    return cached((path, mtime_ns, size), f"tokenizer-{tokenizer_type or 'auto'}",
                  lambda: AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                        local_files_only=True, **kwargs),
                  lambda entry, flags: _named(AutoTokenizer.from_pretrained(
                      entry, trust_remote_code=trust_remote_code, local_files_only=True, **flags), directory),
                  _bos_eos_flags)


def _bos_eos_flags(tokenizer: PreTrainedTokenizerBase) -> dict:
    """add_bos_token / add_eos_token as the GGUF build set them: `save_pretrained` leaves them out
    (the saved post-processor adds the tokens), but code that reads the flags must see the same."""
    return {name: getattr(tokenizer, name) for name in ("add_bos_token", "add_eos_token") if hasattr(tokenizer, name)}


def _named(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> PreTrainedTokenizerBase:
    # Where transformers' own build says it came from, not the cache entry.
    tokenizer.name_or_path = tokenizer.init_kwargs["name_or_path"] = name_or_path
    return tokenizer


def _gguf_tokenizer_type(source: ModelSource) -> str | None:
    """The `tokenizer_type` that makes AutoTokenizer take, for this GGUF file, the class it would
    pick anyway, or None to let it choose.

    Left to choose, AutoTokenizer parses the whole file again with gguf-py (as long as the config
    parse: ~13 s for Gemma 3's vocabulary) only to learn the model type; the loader has that
    config cached. The class then follows from the model type alone unless a tokenizer_config.json
    lies next to the file, the config names a tokenizer class, or the type maps to Mistral's
    backend (chosen by other files): those keep AutoTokenizer's own choice.
    """
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, TOKENIZER_MAPPING_NAMES

    assert source.gguf_path is not None
    if os.path.exists(os.path.join(os.path.dirname(source.gguf_path), "tokenizer_config.json")):
        return None
    try:
        config = load_hf_config(source)
    except Exception:  # noqa: BLE001  only a shortcut: AutoTokenizer then fails (or not) its own way
        return None
    model_type = getattr(config, "model_type", None)
    name = TOKENIZER_MAPPING_NAMES.get(model_type) if model_type else None
    if name is None or name == "MistralCommonBackend" or getattr(config, "tokenizer_class", None):
        return None
    # AutoTokenizer's model-type branch looks the class up by config class; use the type only when both agree.
    registered = TOKENIZER_MAPPING.get(type(config), None)
    return model_type if getattr(registered, "__name__", None) == name else None
