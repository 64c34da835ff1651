"""Engine configuration: validated once, frozen afterwards.

`EngineConfig` holds what the user asked for. The engine resolves the fields that
depend on the model (dtype "auto", max_model_len None, ...) at start-up with
`resolve()`, which returns a new frozen config; nothing mutates it after that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from pagellm.spec_decode.config import SpeculativeConfig

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICES = ("auto", "cpu", "cuda")
_ATTENTION_BACKENDS = ("auto", "torch", "triton", "cpu")
_LOAD_FORMATS = ("auto", "dummy")
_SCHEDULING_POLICIES = ("fcfs", "priority")
# auto: what the checkpoint is; none: dequantize at load; a format: must be the checkpoint's;
# fp8 / int8 on a full-precision checkpoint: online W8A8 (pagellm/layers/quantization/registry.py)
_QUANTIZATION = ("auto", "none", "gguf", "gptq", "awq", "compressed-tensors", "fp8", "int8")
_EXECUTOR_BACKENDS = ("auto", "uni", "mp", "ray")
# auto: the model dtype; fp8 (= fp8_e4m3): e4m3 values with a per-layer scale; int8: per token-head scales
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "int8")

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB of KV cache on the CPU unless told otherwise
DEFAULT_MAX_MODEL_LEN_CAP = 8192  # a model claiming 128k context should not get a 128k default on the CPU


@dataclass(frozen=True)
class EngineConfig:
    model: Optional[str] = None  # HF dir, .gguf file; None = the embedded default model
    tokenizer: Optional[str] = None  # defaults to the model's own tokenizer
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    max_model_len: Optional[int] = None  # None: the model's own limit (capped at 8192)
    block_size: int = 16
    kv_cache_memory: Optional[int] = None  # bytes of KV cache (CPU); None: 1 GiB
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8 / fp8_e4m3 / int8: quantized cache (more tokens)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + activations + KV (CUDA)
    max_num_seqs: int = 128
    max_num_batched_tokens: Optional[int] = None  # None: 2048 with chunked prefill, else max_model_len
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    structured_outputs_backend: str = "auto"  # xgrammar, and llguidance for schemas xgrammar cannot enforce
    scheduling_policy: str = "fcfs"  # fcfs: arrival order; priority: (request priority, arrival), lower first
    seed: int = 0
    attention_backend: str = "auto"  # auto: triton on CUDA, cpu (C++ decode kernel) on the CPU
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    load_format: str = "auto"  # dummy: random weights from config.json alone (benchmarks)
    cpu_weight_prepack: bool = True  # CPU: linear weights in oneDNN's packed layout (faster matmuls)
    cpu_fused_ops: bool = True  # CPU: C++ RMSNorm(+residual) and SiLU-and-mul instead of torch expressions
    # CPU: GGUF layers (32-value block types) quantize decode activations to int8 per block and use
    # integer dot products, as llama.cpp does: faster, no longer exact (off: weight-only, fp32 math)
    cpu_int8_activations: bool = False
    # CPU: GGUF Q4_0/Q4_1/Q8_0 linear weights rearranged at load into 16-row tiles (same bytes): one
    # SIMD lane per output row, about 2x the row layout's matmul speed (off: the on-disk row layout)
    cpu_gguf_tiles: bool = True
    quantization: str = "auto"  # auto: weights stay as the checkpoint stores them; none: dequantize at load
    tensor_parallel_size: int = 1  # ranks each layer's heads / columns are split across
    pipeline_parallel_size: int = 1  # stages the layers are split across (each stage tp ranks)
    data_parallel_size: int = 1  # engine cores (each its own scheduler, KV cache and tp x pp ranks); server only
    distributed_executor_backend: str = "auto"  # auto: uni for one rank, else mp (one process per rank); ray: Ray actors
    enable_expert_parallel: bool = False  # MoE: whole experts split over the tp ranks instead of each expert sharded
    # None: off; a dict / JSON text / SpeculativeConfig, normalized to a SpeculativeConfig here
    speculative_config: Union[SpeculativeConfig, dict, str, None] = None
    # LoRA (pagellm/lora): adapters per request; max_loras slots on the device, max_cpu_loras in host memory
    enable_lora: bool = False
    max_loras: int = 4  # distinct adapters in one step (the device slots)
    max_lora_rank: int = 16  # slots are sized for this rank; a larger adapter is refused
    max_cpu_loras: Optional[int] = None  # adapters kept in host memory (None: max_loras)
    lora_allow_bin: bool = False  # accept pickled adapter_model.bin files (unpickling can run code)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"EngineConfig.{name}: {why}, got {getattr(self, name)!r}")

        # frozen: the one normalization done in place (a bad key is a ValueError naming it)
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.dtype not in _DTYPES:
            bad("dtype", f"must be one of {_DTYPES}")
        if self.device not in _DEVICES:
            bad("device", f"must be one of {_DEVICES}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            bad("attention_backend", f"must be one of {_ATTENTION_BACKENDS}")
        if self.structured_outputs_backend not in ("auto", "xgrammar", "guidance"):
            bad("structured_outputs_backend", "must be one of ('auto', 'xgrammar', 'guidance')")
        if self.scheduling_policy not in _SCHEDULING_POLICIES:
            bad("scheduling_policy", f"must be one of {_SCHEDULING_POLICIES}")
        if self.quantization not in _QUANTIZATION:
            bad("quantization", f"must be one of {_QUANTIZATION}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"must be one of {_KV_CACHE_DTYPES}")
        if self.load_format not in _LOAD_FORMATS:
            bad("load_format", f"must be one of {_LOAD_FORMATS}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            bad("max_model_len", "must be a positive integer")
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block_size", "must be a positive power of two")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0):
            bad("kv_cache_memory", "must be a positive number of bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            bad("max_num_seqs", "must be a positive integer")
        if self.max_num_batched_tokens is not None and (
            not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1
        ):
            bad("max_num_batched_tokens", "must be a positive integer")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.distributed_executor_backend not in _EXECUTOR_BACKENDS:
            bad("distributed_executor_backend", f"must be one of {_EXECUTOR_BACKENDS}")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            bad("distributed_executor_backend",
                f"'uni' runs one worker, but the layout has {self.world_size} ranks ({self.layout_summary()}); use 'mp'")
        for name in ("max_loras", "max_lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int)
                                               or self.max_cpu_loras < self.max_loras):
            bad("max_cpu_loras", f"must be an integer >= max_loras ({self.max_loras})")
        if not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if (
            self.max_model_len is not None
            and self.max_num_batched_tokens is not None
            and not self.enable_chunked_prefill
            and self.max_num_batched_tokens < self.max_model_len
        ):
            bad(
                "max_num_batched_tokens",
                f"must be >= max_model_len ({self.max_model_len}) when chunked prefill is off, "
                "or a long prompt could never be scheduled",
            )

    @property
    def world_size(self) -> int:
        """Ranks one engine core drives: tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def total_world_size(self) -> int:
        """Ranks of every engine core together: dp x tp x pp (the devices a CUDA layout needs)."""
        return self.data_parallel_size * self.world_size

    def layout_summary(self) -> str:
        """The layout: one engine core's ranks (tp x pp), and how many such cores (dp) there are."""
        return f"tp={self.tensor_parallel_size} x pp={self.pipeline_parallel_size} x dp={self.data_parallel_size}"

    def executor_backend(self) -> str:
        """The executor actually used: 'uni', 'mp' or 'ray' (auto never picks ray: it needs a cluster)."""
        if self.distributed_executor_backend == "auto":
            return "uni" if self.world_size == 1 else "mp"
        return self.distributed_executor_backend

    @property
    def lora_host_slots(self) -> int:
        """Adapters the workers keep in host memory."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def resolve(self, *, model_max_len: int, cuda_available: bool,
                cuda_device_count: Optional[int] = None) -> "EngineConfig":
        """Fills the model- and machine-dependent defaults; validates the result (the CUDA device
        count, when given, against every engine core's ranks)."""
        device = self.device
        if device == "auto":
            device = "cuda" if cuda_available else "cpu"
        if device == "cuda" and not cuda_available:
            raise ValueError("EngineConfig.device: 'cuda' was asked for but no CUDA device is available")
        if device == "cuda" and cuda_device_count is not None and self.total_world_size > cuda_device_count:
            raise ValueError(f"EngineConfig.data_parallel_size: {self.data_parallel_size} engine cores x "
                             f"{self.world_size} ranks each ({self.layout_summary()}) = {self.total_world_size} "
                             f"devices, more than the {cuda_device_count} CUDA devices visible (one device per rank)")
        if self.speculative_config is not None and self.pipeline_parallel_size > 1:
            # A pipeline's stages would each need the verified lengths before the next step is
            # scheduled, which defeats the batch queue that keeps the stages busy.
            raise ValueError("EngineConfig.speculative_config: speculative decoding does not run with "
                             f"pipeline_parallel_size > 1 (got {self.pipeline_parallel_size})")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        max_model_len = self.max_model_len
        if max_model_len is None:
            max_model_len = min(model_max_len, DEFAULT_MAX_MODEL_LEN_CAP)
        elif max_model_len > model_max_len:
            raise ValueError(
                f"EngineConfig.max_model_len: {max_model_len} is more than the model's limit of {model_max_len} tokens"
            )
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max_model_len
        return dataclasses.replace(
            self,
            device=device,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_batched_tokens=batched,
            kv_cache_memory=self.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY,
        )
