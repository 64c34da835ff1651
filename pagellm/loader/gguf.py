"""GGUF files (llama.cpp's format): header checks, and weights in Hugging Face naming.

With quantization="none" every tensor is dequantized, meant to equal, bit for bit, what transformers
loads from the same file (its GGUF path also dequantizes with gguf-py, then undoes the same
llama.cpp conventions). With "auto" the linear layers' weights of the types the C++ kernel knows
stay as their raw blocks (`GGUFQuantizedTensor`); everything else is dequantized as before.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from pagellm.ops.gguf_cpu import load_gguf_ops

if TYPE_CHECKING:
    from pagellm.layers.quantization.gguf import GGUFQuantizedTensor

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Header and tensor table, parsed without touching tensor data: a cheap structural check, so a
# damaged file fails with one clear message before any slower parser sees it, and the map of where
# each tensor's bytes lie.
# ---------------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone
_DEFAULT_ALIGNMENT = 32  # llama.cpp's default when general.alignment is absent
# GGUF metadata value types with a fixed width -> struct format
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores ne0, the fastest dimension, first)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Metadata of a GGUF file. Array values are not decoded; only their lengths are kept."""

    metadata: dict[str, object]
    array_lengths: dict[str, int]
    tensors: list[GGUFTensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])


class _Cursor:
    """Little-endian reads from a buffer, with bounds checks that name what ran short."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"the file ends at byte {len(self.buf)}, in the middle of its header")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        if self.pos + length > len(self.buf):
            raise ValueError(f"the file ends at byte {len(self.buf)}, in the middle of its header")
        text = self.buf[self.pos : self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def skip_string(self) -> None:
        (length,) = self.unpack("Q")
        self.pos += length

    def value(self, value_type: int) -> object:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self.string()
        raise ValueError(f"unknown metadata value type {value_type}")

    def skip_array(self, element_type: int, count: int) -> None:
        if element_type in _SCALAR_FORMATS:
            self.pos += count * struct.calcsize(_SCALAR_FORMATS[element_type])
        elif element_type == _STRING:  # variable length: each entry has to be walked
            for _ in range(count):
                self.skip_string()
        elif element_type == _ARRAY:
            for _ in range(count):
                inner_type, inner_count = self.unpack("IQ")
                self.skip_array(inner_type, inner_count)
        else:
            raise ValueError(f"unknown metadata array element type {element_type}")
        if self.pos > len(self.buf):
            raise ValueError(f"the file ends at byte {len(self.buf)}, in the middle of its header")


def _parse_header(buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf)
    if cur.unpack("4s")[0] != _MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    (version,) = cur.unpack("I")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (supported: {_SUPPORTED_VERSIONS})")
    tensor_count, kv_count = cur.unpack("QQ")

    metadata: dict[str, object] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = cur.string()
        (value_type,) = cur.unpack("I")
        if value_type == _ARRAY:
            element_type, count = cur.unpack("IQ")
            cur.skip_array(element_type, count)
            array_lengths[key] = count
        else:
            metadata[key] = cur.value(value_type)
    if "general.architecture" not in metadata:
        raise ValueError("its metadata has no general.architecture")

    entries, data_end = [], 0
    for _ in range(tensor_count):
        name = cur.string()
        (n_dims,) = cur.unpack("I")
        dims = cur.unpack(f"{n_dims}Q")
        type_id, offset = cur.unpack("IQ")
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_elements = math.prod(dims)
        if n_elements % block_size:
            raise ValueError(f"tensor {name!r} has {n_elements} elements, not a multiple of {ggml_type.name} blocks")
        nbytes = n_elements // block_size * type_size
        data_end = max(data_end, offset + nbytes)
        entries.append((name, tuple(reversed(dims)), ggml_type, offset, nbytes))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[arg-type]
    if alignment <= 0:
        raise ValueError(f"general.alignment must be positive, got {alignment}")
    # tensor offsets count from the data section, which starts at the next alignment boundary
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if data_start + data_end > len(buf):
        raise ValueError(f"it is truncated: its tensors need {data_start + data_end} bytes but the file has {len(buf)}")
    tensors = [GGUFTensorInfo(n, shape, t, data_start + off, nb) for n, shape, t, off, nb in entries]
    return GGUFHeader(metadata, array_lengths, tensors)


def read_gguf_header(path: str) -> GGUFHeader:
    """Parse and check the header and tensor table of a GGUF file; ValueError if it is damaged."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("it is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(buf)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"{path} is not a valid GGUF file: {exc}") from exc


def check_gguf_file(path: str) -> None:
    """Raise ValueError("... is not a valid GGUF file: ...") unless `path` is structurally sound."""
    read_gguf_header(path)


def gguf_architecture(path: str) -> str:
    """The llama.cpp architecture name of a GGUF file ("llama", "gemma3", ...)."""
    return read_gguf_header(str(path)).architecture


# ---------------------------------------------------------------------------------------------
# Tensor names: llama.cpp -> Hugging Face
# ---------------------------------------------------------------------------------------------

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma 2/3 wrap both the attention and the MLP between two norms. llama.cpp names the extra ones
# post_attention_norm / post_ffw_norm and keeps ffn_norm for the norm *before* the MLP, so HF's
# post_attention_layernorm comes from post_attention_norm here, not from ffn_norm.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Phi-3 keeps q/k/v fused in one attn_qkv tensor and gate/up fused in ffn_up ([gate | up] rows),
# exactly as HF's Phi3 checkpoints store qkv_proj and gate_up_proj; no reordering is needed.
_PHI3_LAYER_NAMES = {
    **{k: v for k, v in _LAYER_NAMES.items() if k not in ("ffn_gate", "ffn_up")},
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}

# Architectures whose tensors this module knows how to convert. An architecture with other
# conventions (MoE experts, ...) must be added deliberately, not guessed at.
_ARCH_LAYER_NAMES = {
    "llama": _LAYER_NAMES,
    "qwen2": _LAYER_NAMES,
    "qwen3": _LAYER_NAMES,
    "phi3": _PHI3_LAYER_NAMES,
    "gemma2": _GEMMA_LAYER_NAMES,
    "gemma3": _GEMMA_LAYER_NAMES,
}

# Gemma computes its RMSNorm as x * (1 + w) and llama.cpp's converter stores w + 1 so its plain
# RMSNorm works; HF keeps w, so every norm weight is shifted back (as transformers does).
_NORM_OFFSET_ARCHS = {"gemma2", "gemma3"}

# Tensors that are not model parameters. rope_freqs (llama3-style scaling) and Phi-3's
# rope_factors_long/short (longrope) hold rope factors llama.cpp precomputes; HF recomputes them
# from the config, so there is nothing to load.
_SKIPPED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def gguf_to_hf_name(gguf_name: str, architecture: str) -> str | None:
    """HF parameter name for a llama.cpp tensor name; None for tensors that are deliberately skipped."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    layer_names = _ARCH_LAYER_NAMES[architecture]
    if (m := _LAYER_TENSOR.fullmatch(gguf_name)) and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    if (m := _TOP_TENSOR.fullmatch(gguf_name)) and m.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name for architecture {architecture!r}")


def _unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives llama's q_proj/k_proj.

    HF rotates the two halves of each head (i, i + d/2); llama.cpp rotates adjacent pairs (2i, 2i+1),
    so its converter interleaves each head's rows. This is a pure reordering, hence exact.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _head_count(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(key)
    return None if value is None else int(value)  # type: ignore[call-overload]


def _raw_tensor(blob: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """The tensor's bytes as rows of its innermost dimension, the layout gguf-py dequantizes."""
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    row_bytes = info.shape[-1] // block_size * type_size
    return blob[info.offset : info.offset + info.nbytes].reshape(*info.shape[:-1], row_bytes)


# The linear layers' weights (llama.cpp names); norms and biases are always dequantized.
_LINEAR_WEIGHT = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
# Embeddings and the LM head stay quantized where the model uses the embedding only for lookups.
# Gemma 3 scales the looked-up rows by sqrt(hidden) rounded to the embedding's output dtype
# (`VocabEmbedding.dtype`, kept once quantized), so it qualifies; other gemmas still dequantize them.
_EMBEDDING_WEIGHT = re.compile(r"(token_embd|output)\.weight")
_QUANTIZED_EMBEDDING_ARCHS = {"llama", "qwen2", "qwen3", "phi3", "gemma3"}
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
QUANTIZATION_MODES = ("auto", "none")


def iter_gguf_weights(path: str, dtype: torch.dtype, quantization: str = "none",
                      device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in `dtype`) for every parameter in a GGUF file, dequantized one at a time.

    quantization="auto" yields the linear weights whose type the C++ kernel computes on as
    `GGUFQuantizedTensor`s instead (other types are dequantized, with a warning naming them). For a
    GPU (`device` not "cpu") only the linear weights the Triton group GEMM takes after a repack
    (Q4_0, Q4_1, Q8_0) stay quantized; the embedding lookup and LM head kernels are CPU kernels.

    The file is checked and every tensor name resolved here, so a bad file fails at the call rather
    than midway through loading. The tensor table comes from our header parser rather than
    gguf.GGUFReader, which also decodes every metadata array (the tokenizer vocabulary: seconds even
    for a small model). The bytes are the same either way; dequantization is gguf-py's, as in
    transformers.
    """
    header = read_gguf_header(path)
    arch = header.architecture
    if arch not in _ARCH_LAYER_NAMES:
        raise ValueError(
            f"GGUF architecture {arch!r} of {path} is not supported (supported: {sorted(_ARCH_LAYER_NAMES)})"
        )
    n_head = _head_count(header, f"{arch}.attention.head_count")
    n_head_kv = _head_count(header, f"{arch}.attention.head_count_kv") or n_head
    if arch == "llama" and n_head is None:
        raise ValueError(f"{path} lacks {arch}.attention.head_count, needed to restore q_proj/k_proj row order")
    named = [(info, hf_name) for info in header.tensors if (hf_name := gguf_to_hf_name(info.name, arch))]
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_MODES} for a GGUF file, got {quantization!r}")
    keep = _kept_tensors(named, path, arch, device) if quantization == "auto" else set()
    return _dequantized_tensors(path, named, arch, n_head, n_head_kv, dtype, keep)


def _kept_tensors(named: list[tuple[GGUFTensorInfo, str]], path: str, arch: str, device: str = "cpu") -> set[str]:
    """The GGUF names of the weights that stay quantized; warns once per type that cannot."""
    on_cpu = device == "cpu"

    def matrix(name: str) -> bool:
        return bool(_LINEAR_WEIGHT.fullmatch(name)
                    or (on_cpu and arch in _QUANTIZED_EMBEDDING_ARCHS and _EMBEDDING_WEIGHT.fullmatch(name)))

    linear = [info for info, _ in named if matrix(info.name) and info.ggml_type not in _FLOAT_TYPES]
    if linear and not load_gguf_ops():
        logger.warning("%s: no GGUF CPU kernel could be built; dequantizing every weight to full precision", path)
        return set()
    from pagellm.layers.quantization.gguf import GGUF_GPU_KERNEL_TYPES, GGUF_KERNEL_TYPES  # front ends import the loader

    kernel_types = GGUF_KERNEL_TYPES if on_cpu else GGUF_GPU_KERNEL_TYPES
    others = sorted({info.ggml_type.name for info in linear if info.ggml_type not in kernel_types})
    if others:
        logger.warning("%s: ggml types %s have no quantized kernel on %s yet; those weights are dequantized at load",
                       path, ", ".join(others), device)
    return {info.name for info in linear if info.ggml_type in kernel_types}


def _quantized_tensor(blob: np.ndarray, info: GGUFTensorInfo, arch: str, n_head: int | None,
                      n_head_kv: int | None) -> "GGUFQuantizedTensor":
    """The weight's own blocks, copied out of the file; q/k rows reordered as for the dense path
    (a row is a whole number of blocks, so reordering rows of bytes is the same permutation)."""
    from pagellm.layers.quantization.gguf import GGUFQuantizedTensor

    raw = _raw_tensor(blob, info)
    if arch == "llama" and info.name.endswith(".attn_q.weight"):
        raw = _unpermute_rotary_rows(raw, n_head)  # type: ignore[arg-type]
    elif arch == "llama" and info.name.endswith(".attn_k.weight"):
        raw = _unpermute_rotary_rows(raw, n_head_kv)  # type: ignore[arg-type]
    data = torch.from_numpy(np.array(raw, copy=True))
    return GGUFQuantizedTensor(data, info.ggml_type, torch.Size(info.shape))


def _dequantized_tensors(
    path: str,
    named: list[tuple[GGUFTensorInfo, str]],
    arch: str,
    n_head: int | None,
    n_head_kv: int | None,
    dtype: torch.dtype,
    keep: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    # Pages are read only as tensors are touched. A plain ndarray view skips np.memmap's per-slice
    # bookkeeping, which gguf-py's row-chunked dequantization would otherwise pay thousands of times.
    blob = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    desc = f"Loading {os.path.basename(path)}"
    for info, hf_name in tqdm(named, desc=desc, unit="tensor", disable=None):
        if info.name in keep:
            yield hf_name, _quantized_tensor(blob, info, arch, n_head, n_head_kv)  # type: ignore[misc]
            continue
        try:
            weight = dequantize(_raw_tensor(blob, info), info.ggml_type)
        except NotImplementedError as exc:
            raise ValueError(f"GGUF tensor {info.name!r} in {path} uses an unsupported type: {exc}") from exc
        weight = weight.astype(np.float32, copy=False).reshape(info.shape)
        # The fix-ups run in float32, before the cast, in the order transformers applies them.
        if arch == "llama" and info.name.endswith((".attn_q.weight", ".attn_q.bias")):
            weight = _unpermute_rotary_rows(weight, n_head)  # type: ignore[arg-type]
        elif arch == "llama" and info.name.endswith((".attn_k.weight", ".attn_k.bias")):
            weight = _unpermute_rotary_rows(weight, n_head_kv)  # type: ignore[arg-type]
        elif arch in _NORM_OFFSET_ARCHS and info.name.endswith("norm.weight"):
            weight = weight - 1.0
        # Unconverted F32 data is still a read-only view of the file; torch wants its own copy.
        weight = np.array(weight, copy=True) if not weight.flags.writeable else np.ascontiguousarray(weight)
        yield hf_name, torch.from_numpy(weight).to(dtype)
