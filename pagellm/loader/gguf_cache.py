"""An on-disk cache of what transformers builds from a GGUF file's metadata: its config and tokenizer.

transformers reads both by walking every metadata array with gguf-py, one numpy slice per
vocabulary entry: about 4 s (config) + 3 s (tokenizer) for SmolLM2's 49k tokens and 13 s + more
for Gemma 3's 262k, in every process that loads the file (a server's front end, its engine core,
each worker). The results are plain HF artefacts, so they are saved with `save_pretrained` once and
read back with `from_pretrained` (milliseconds), like a converted checkpoint.

An entry is keyed by the file's identity (absolute path, mtime, size: a replaced or rewritten file
gets a new entry), the transformers version (its GGUF conversion may change) and, for tokenizers,
the class asked for. Entries appear by an atomic rename, so a reader never sees half of one and two
processes filling the same entry at once are harmless. Where the cache cannot be written (a
read-only home), loading works as without it. `PAGELLM_CACHE_DIR` moves it (default
`~/.cache/pagellm`); `PAGELLM_GGUF_CACHE=0` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TypeVar

import transformers

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "PAGELLM_CACHE_DIR"
ENABLE_ENV = "PAGELLM_GGUF_CACHE"
EXTRA_FILE = "pagellm-extra.json"  # what save_pretrained leaves out (see `cached`)
T = TypeVar("T")


def cache_root() -> str:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pagellm")
    return os.path.join(root, "gguf-metadata")


def entry_dir(identity: tuple[str, int, int], kind: str) -> str:
    """The directory of one entry: `kind` ("config", "tokenizer-<class or auto>") of one file."""
    key = "|".join([*map(str, identity), transformers.__version__, kind])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return os.path.join(cache_root(), f"{os.path.basename(identity[0])}-{kind}-{digest}")


def cached(identity: tuple[str, int, int], kind: str, build: Callable[[], T], load: Callable[[str, dict], T],
           extra: Callable[[T], dict] = lambda _: {}) -> T:
    """`load(entry, extras)` when the entry exists, else `build()`, saved into a new entry for next time
    (`save_pretrained`, plus `extra(artefact)`: settings the save leaves out, given back as `extras`)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return build()
    where = entry_dir(identity, kind)
    if os.path.isdir(where):
        try:
            with open(os.path.join(where, EXTRA_FILE), encoding="utf-8") as f:
                return load(where, json.load(f))
        except Exception as exc:  # noqa: BLE001  a damaged entry: build again and replace it
            logger.warning("ignoring the unreadable cache entry %s (%s: %s)", where, type(exc).__name__, exc)
            shutil.rmtree(where, ignore_errors=True)
    result = build()
    _save(result, extra(result), where)
    return result


def _save(artefact, extras: dict, where: str) -> None:
    try:
        os.makedirs(os.path.dirname(where), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(where))
    except OSError as exc:
        logger.debug("GGUF metadata cache not writable (%s)", exc)
        return
    try:
        artefact.save_pretrained(staging)
        with open(os.path.join(staging, EXTRA_FILE), "w", encoding="utf-8") as f:
            json.dump(extras, f)
        os.rename(staging, where)  # atomic; fails when another process got there first
    except Exception as exc:  # noqa: BLE001  a cache only: the artefact in hand is returned regardless
        logger.debug("GGUF metadata cache entry %s not saved (%s)", where, exc)
        shutil.rmtree(staging, ignore_errors=True)
