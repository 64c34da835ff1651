"""The on-disk cache of GGUF configs and tokenizers (loader/gguf_cache.py): what comes back from an
entry equals transformers' own build from the file, and a bad or unwritable cache never breaks a load."""

from __future__ import annotations

import os

import pytest

from pagellm.loader import hf, load_hf_config, resolve_model_source
from pagellm.loader import gguf_cache, tokenizer
from pagellm.loader.tokenizer import load_tokenizer
from tests.test_smollm_parity import PROMPTS


def _clear_process_memo() -> None:
    hf._gguf_config.cache_clear()
    tokenizer._gguf_tokenizer.cache_clear()


def _fresh_loads(source):
    _clear_process_memo()
    return load_hf_config(source), load_tokenizer(source)


@pytest.fixture
def process_memo_cleared_after():
    """Later tests must not get the artefacts this test loaded from its own cache directory, even
    when it fails."""
    yield
    _clear_process_memo()


@pytest.mark.slow
def test_smollm2_config_and_tokenizer_from_the_cache_equal_the_gguf_build(smollm_path, tmp_path, monkeypatch,
                                                                         process_memo_cleared_after):
    source = resolve_model_source(smollm_path)
    monkeypatch.setenv(gguf_cache.CACHE_DIR_ENV, str(tmp_path))  # empty: the first load converts the file
    config, tok = _fresh_loads(source)
    identity = hf.file_identity(smollm_path)
    assert os.path.isfile(os.path.join(gguf_cache.entry_dir(identity, "config"), gguf_cache.EXTRA_FILE))
    monkeypatch.setattr(hf.AutoConfig, "from_pretrained", _only_from_cache(hf.AutoConfig.from_pretrained))
    monkeypatch.setattr(tokenizer.AutoTokenizer, "from_pretrained",
                        _only_from_cache(tokenizer.AutoTokenizer.from_pretrained))
    cached_config, cached_tok = _fresh_loads(source)
    assert type(cached_config) is type(config) and cached_config.to_dict() == config.to_dict()
    assert type(cached_tok) is type(tok) and cached_tok.name_or_path == tok.name_or_path
    assert cached_tok.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert cached_tok.get_vocab() == tok.get_vocab() and cached_tok.all_special_ids == tok.all_special_ids
    assert (cached_tok.add_bos_token, cached_tok.add_eos_token) == (tok.add_bos_token, tok.add_eos_token)
    assert cached_tok.chat_template == tok.chat_template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    assert cached_tok.apply_chat_template(messages, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        assert cached_tok(prompt).input_ids == ids and cached_tok.decode(ids) == tok.decode(ids)


def _only_from_cache(original):
    def from_pretrained(*args, **kwargs):
        assert "gguf_file" not in kwargs, "converted the GGUF file although the cache holds it"
        return original(*args, **kwargs)
    return from_pretrained


class _Artefact:
    def __init__(self, value: str):
        self.value = value

    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, "value.txt"), "w") as f:
            f.write(self.value)


def _load(entry: str, extras: dict) -> _Artefact:
    with open(os.path.join(entry, "value.txt")) as f:
        return _Artefact(f.read() + extras["suffix"])


def test_entries_are_keyed_by_file_identity_and_damaged_ones_are_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    builds = []

    def build(value="built"):
        builds.append(value)
        return _Artefact(value)

    identity = ("/models/m.gguf", 1, 100)
    extra = lambda a: {"suffix": "+"}  # noqa: E731
    assert gguf_cache.cached(identity, "config", build, _load, extra).value == "built"
    assert gguf_cache.cached(identity, "config", build, _load, extra).value == "built+"  # from the entry
    assert builds == ["built"]
    # A rewritten file (new mtime) or another kind is another entry.
    gguf_cache.cached(("/models/m.gguf", 2, 100), "config", build, _load, extra)
    gguf_cache.cached(identity, "tokenizer-auto", build, _load, extra)
    assert len(builds) == 3
    # An entry missing its extras file (damaged by hand) is rebuilt, not trusted.
    os.remove(os.path.join(gguf_cache.entry_dir(identity, "config"), gguf_cache.EXTRA_FILE))
    assert gguf_cache.cached(identity, "config", build, _load, extra).value == "built"
    assert gguf_cache.cached(identity, "config", build, _load, extra).value == "built+"
    assert len(builds) == 4
    # Off by the environment: always built, nothing read.
    monkeypatch.setenv(gguf_cache.ENABLE_ENV, "0")
    assert gguf_cache.cached(identity, "config", build, _load, extra).value == "built"


def test_an_unwritable_cache_only_costs_the_conversion(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(gguf_cache.CACHE_DIR_ENV, str(blocker))
    for _ in range(2):
        assert gguf_cache.cached(("/m.gguf", 1, 1), "config", lambda: _Artefact("x"), _load).value == "x"
    assert blocker.is_file()
