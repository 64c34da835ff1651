"""Safetensors checkpoints of a quantized format: each quantized weight's tensors, grouped.

A GPTQ layer is stored as `<prefix>.qweight`, `.qzeros`, `.scales` (and `.g_idx`), an FP8 one as
`<prefix>.weight` with `.weight_scale`, and so on. The loader yields one
(`<prefix>.weight`, `QuantizedWeight`) pair per such layer, built by the checkpoint's format from
its tensors in their stored dtypes, once all of them have been read (they may sit in different
shard files). Every other tensor (norms, embeddings, biases, an unquantized LM head) is yielded
as a plain tensor in the model dtype, as for a full-precision checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors import safe_open

from pagellm.layers.quantization.base import CheckpointFormat
from pagellm.loader.lazy import LazyTensor


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error type for damaged headers
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc


def quantized_prefixes(names: set[str], fmt: CheckpointFormat) -> dict[str, set[str]]:
    """{module prefix: the names of its quantized-weight tensors} for every quantized layer in `names`."""
    groups: dict[str, set[str]] = {}
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        if suffix in fmt.marker_suffixes():
            groups[prefix] = {f"{prefix}.{s}" for s in fmt.part_suffixes() if f"{prefix}.{s}" in names}
    return groups


def iter_quantized_safetensors(paths: list[str], dtype: torch.dtype, fmt: CheckpointFormat,
                               dequantize: bool = False, lazy: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (name, tensor) and (`<prefix>.weight`, QuantizedWeight) pairs; with `dequantize`, the
    quantized weights are expanded to dense `dtype` tensors instead (--quantization none).
    lazy=True yields the plain tensors as `LazyTensor`s (valid until the next one is asked for)."""
    names_by_file: list[tuple[str, list[str]]] = []
    for path in paths:
        with _open(path) as f:
            names_by_file.append((path, list(f.keys())))
    groups = quantized_prefixes({n for _, names in names_by_file for n in names}, fmt)
    owner = {name: prefix for prefix, members in groups.items() for name in members}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path, names in names_by_file:
        with _open(path) as f:
            for name in names:
                prefix = owner.get(name)
                if prefix is None:
                    yield name, LazyTensor(f, name, dtype) if lazy else f.get_tensor(name).to(dtype)
                    continue
                parts = pending.setdefault(prefix, {})
                parts[name.rpartition(".")[2]] = f.get_tensor(name)
                if len(parts) < len(groups[prefix]):
                    continue
                del pending[prefix]
                try:
                    weight = fmt.build(prefix, parts)
                except ValueError as exc:
                    raise ValueError(f"{fmt.name} weight {prefix}: {exc}") from exc
                yield f"{prefix}.weight", weight.dequantize().to(dtype) if dequantize else weight
