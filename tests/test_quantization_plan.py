"""`--quantization` against what the checkpoint is (layers/quantization/registry.py), and the
quantized-safetensors grouping of the loader (loader/quantized.py) with a toy format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pagellm.layers.quantization.base import CheckpointFormat, QuantizedWeight
from pagellm.layers.quantization.registry import CHECKPOINT_FORMATS, ONLINE_METHODS, plan_quantization
from pagellm.loader.quantized import iter_quantized_safetensors
from pagellm.quantization_rules import CHECKPOINT_FORMAT_NAMES, ONLINE_METHOD_NAMES


def test_gguf_plans():
    assert plan_quantization("auto", "gguf").method == "gguf"
    assert plan_quantization("gguf", "gguf").method == "gguf"
    assert plan_quantization("none", "gguf").method == "none"
    on_gpu = plan_quantization("auto", "gguf", device="cuda")  # the group GEMM's types only, see the loader
    assert on_gpu.method == "gguf" and on_gpu.device == "cuda"
    with pytest.raises(ValueError, match="GGUF file is quantized by its own block types"):
        plan_quantization("gptq", "gguf")


def test_full_precision_checkpoint_plans():
    assert plan_quantization("auto", "hf").method == "none"
    assert plan_quantization("none", "hf").method == "none"
    with pytest.raises(ValueError, match="not quantized.*fp8, int8"):
        plan_quantization("gptq", "hf")


def test_unsupported_and_mismatched_checkpoint_methods():
    with pytest.raises(ValueError, match="'bitsandbytes', which is not supported; supported checkpoint formats: gptq"):
        plan_quantization("auto", "hf", {"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="--quantization awq does not match the checkpoint, which is quantized with gptq"):
        plan_quantization("awq", "hf", {"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="no quant_method"):
        plan_quantization("auto", "hf", {"bits": 4})
    # the front end's name rules and the worker's registry name the same methods
    assert tuple(CHECKPOINT_FORMATS) == CHECKPOINT_FORMAT_NAMES == ("gptq", "awq", "compressed-tensors", "fp8")
    assert tuple(ONLINE_METHODS) == ONLINE_METHOD_NAMES == ("fp8", "int8")


class _ToyWeight(QuantizedWeight):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes, self.scale, self.shape = codes, scale, codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def narrow(self, dim, start, length):
        raise NotImplementedError

    def linear_method(self, layer):
        raise NotImplementedError


class _ToyFormat(CheckpointFormat):
    name = "toy"

    @classmethod
    def from_config(cls, config):
        return cls()

    def marker_suffixes(self):
        return ("codes",)

    def part_suffixes(self):
        return ("codes", "scale")

    def build(self, prefix, parts):
        if parts["codes"].dtype != torch.int8:
            raise ValueError("codes must be int8")
        return _ToyWeight(parts["codes"], parts["scale"])


def test_loader_groups_a_weights_tensors_across_shard_files(tmp_path):
    codes = torch.randint(-8, 8, (4, 6), dtype=torch.int8)
    scale = torch.rand(4) + 0.5
    first, second = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"m.proj.codes": codes, "m.norm.weight": torch.ones(6, dtype=torch.float16)}, first)
    save_file({"m.proj.scale": scale, "m.proj.bias": torch.zeros(4)}, second)
    got = dict(iter_quantized_safetensors([first, second], torch.float32, _ToyFormat()))
    assert set(got) == {"m.proj.weight", "m.norm.weight", "m.proj.bias"}
    assert isinstance(got["m.proj.weight"], _ToyWeight) and torch.equal(got["m.proj.weight"].codes, codes)
    assert got["m.norm.weight"].dtype == torch.float32  # plain tensors in the model dtype
    dense = dict(iter_quantized_safetensors([first, second], torch.bfloat16, _ToyFormat(), dequantize=True))
    assert dense["m.proj.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(dense["m.proj.weight"].float(), (codes.float() * scale[:, None]).bfloat16().float())
    save_file({"m.proj.codes": codes.float(), "m.proj.scale": scale}, first)
    with pytest.raises(ValueError, match="toy weight m.proj: codes must be int8"):
        list(iter_quantized_safetensors([first], torch.float32, _ToyFormat()))


def test_cli_quantization_flags():
    from pagellm.entrypoints.cli import build_parser, engine_kwargs

    def kwargs(*argv):
        return engine_kwargs(build_parser().parse_args(["generate", *argv, "hi"]))

    assert kwargs("--dequantize")["quantization"] == "none"
    assert kwargs("--quantization", "int8")["quantization"] == "int8"
    assert "quantization" not in kwargs()
    with pytest.raises(ValueError, match="quantization"):
        from pagellm.config import EngineConfig
        EngineConfig(quantization="int3").resolve(model_max_len=64, cuda_available=False)
