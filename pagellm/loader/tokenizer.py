"""Tokenizers for HF directories and GGUF files, through transformers' AutoTokenizer."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagellm.loader.gguf import read_gguf_header
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
        return AutoTokenizer.from_pretrained(
            directory, trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"could not load the tokenizer of {where}: {exc}; {_HINT}") from exc
