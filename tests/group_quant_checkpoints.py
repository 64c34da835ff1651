"""Group-quantized checkpoints written in their on-disk layouts (GPTQ, AutoAWQ GEMM, compressed-tensors
pack-quantized), packed here from the formats' specs, independently of the loader's unpackers
(pagellm/layers/quantization/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_NIBBLE_COLUMNS = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of a word holds column AWQ_NIBBLE_COLUMNS[i]


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 bits -> int32 with the same bit pattern."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_low_bits_first(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Consecutive entries along `dim` into int32 words, the first in the lowest bits."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    pad = -v.shape[-1] % per_word
    v = torch.nn.functional.pad(v, (0, pad)).reshape(*v.shape[:-1], -1, per_word)
    words = sum(v[..., j] << (bits * j) for j in range(per_word))
    return to_int32(words).movedim(-1, dim).contiguous()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(R, C) 4-bit values -> (R, C/8) int32 in AWQ's interleaved order."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    return to_int32(sum(v[..., AWQ_NIBBLE_COLUMNS[i]] << (4 * i) for i in range(8)))


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, asym: bool, g_idx: torch.Tensor,
                    scale_dtype: torch.dtype = torch.float16):
    """Round-to-nearest quantization of the (N, K) weight by the groups g_idx names: unsigned codes
    (N, K), scales (float16, as GPTQ and AWQ store them) and integer zero points (groups, N)."""
    n, k = w.shape
    groups = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if asym:
            lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
            scales[g] = ((hi - lo) / maxq).clamp(min=1e-4)
            zeros[g] = torch.round(-lo / scales[g].to(scale_dtype).float()).clamp(0, maxq).long()
        else:
            scales[g] = (cols.abs().max(1).values / (maxq // 2)).clamp(min=1e-4)
            zeros[g] = 1 << (bits - 1)
    scales = scales.to(scale_dtype)
    s, z = scales.float()[g_idx].T, zeros[g_idx].T  # per (n, k)
    codes = torch.clamp(torch.round(w / s) + z, 0, maxq).long()
    return codes, scales, zeros


def act_order_g_idx(k: int, group_size: int, seed: int) -> torch.Tensor:
    """A desc_act g_idx: inputs taken in a random order, every group_size of them one group."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


PROJ_INPUTS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
               "up_proj": "mlp", "down_proj": "down"}  # layers fed the same input share an act order


def write_quantized_llama(base: Path, path: Path, fmt: str, bits: int, group_size: int, asym: bool,
                          act_order: bool = False, v1: bool = True, g_idx_stored: bool = True) -> dict:
    """`base`'s model with every *_proj weight replaced by `fmt`'s tensors and its quantization_config
    in config.json. Returns the quantized tensors' bytes ("disk_bytes", "g_idx_bytes") and the
    float64 weights they stand for ("expected", by name)."""
    state = load_file(str(base / "model.safetensors"))
    out, disk, g_idx_bytes, expected = {}, 0, 0, {}
    for name, w in state.items():
        module, _, leaf = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if proj not in PROJ_INPUTS or leaf != "weight":
            out[name] = w
            continue
        n, k = w.shape
        g = k if group_size == -1 else group_size
        layer_id = int(module.split(".")[2])
        g_idx = (act_order_g_idx(k, g, seed=layer_id * 10 + len(PROJ_INPUTS[proj])) if act_order
                 else (torch.arange(k) // g).to(torch.int32))
        # compressed-tensors keeps scales in the model dtype (bfloat16 here; float16 holds them exactly)
        scale_dtype = torch.bfloat16 if fmt == "compressed-tensors" else torch.float16
        codes, scales, zeros = quantize_groups(w.float(), bits, g, asym, g_idx.long(), scale_dtype)
        expected[name] = (codes - zeros[g_idx.long()].T).double() * scales.double()[g_idx.long()].T
        if fmt == "gptq":
            stored_zeros = (zeros - 1) & ((1 << bits) - 1) if v1 else zeros
            tensors = {"qweight": pack_low_bits_first(codes.T, bits, dim=0),
                       "qzeros": pack_low_bits_first(stored_zeros, bits, dim=1), "scales": scales}
            if g_idx_stored:
                tensors["g_idx"] = g_idx
        elif fmt == "awq":
            tensors = {"qweight": pack_awq(codes.T), "qzeros": pack_awq(zeros), "scales": scales}
        elif fmt == "compressed-tensors":  # pack-quantized: signed codes + 2^(bits-1), i.e. the unsigned ones
            tensors = {"weight_packed": pack_low_bits_first(codes, bits, dim=1), "weight_scale": scales.T,
                       "weight_shape": torch.tensor([n, k])}
            if asym:  # signed zero points + 2^(bits-1), packed along the output dim
                tensors["weight_zero_point"] = pack_low_bits_first(zeros.T, bits, dim=0)
            if act_order:
                tensors["weight_g_idx"] = g_idx
        else:
            raise AssertionError(fmt)
        for suffix, t in tensors.items():
            out[f"{module}.{suffix}"] = t.contiguous()
            disk += t.numel() * t.element_size()
        g_idx_bytes += sum(t.numel() * t.element_size() for s, t in tensors.items() if s.endswith("g_idx"))
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    if fmt == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": act_order, "sym": not asym,
                                         "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    elif fmt == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
    else:
        weights = {"num_bits": bits, "type": "int", "symmetric": not asym, "dynamic": False,
                   "strategy": "channel" if group_size == -1 else "group",
                   "group_size": None if group_size == -1 else group_size, "actorder": "group" if act_order else None}
        config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                         "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                                       "input_activations": None}},
                                         "ignore": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return {"disk_bytes": disk, "g_idx_bytes": g_idx_bytes, "expected": expected}
