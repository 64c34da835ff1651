"""`pagellm` command line: generate / serve / chat / bench.

Engine flags are derived from EngineConfig's fields (`max_model_len` -> `--max-model-len`),
so every field is settable and the names follow vLLM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Optional

from pagellm.config import EngineConfig

_HELP = {
    "model": "HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    "tokenizer": "tokenizer directory/.gguf if not the model's own",
    "skip_tokenizer_init": "load no tokenizer; prompts must be token ids",
    "trust_remote_code": "allow custom tokenizer code from the model directory",
    "dtype": "weights/activations dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    "device": "cpu, cuda or auto",
    "max_model_len": "longest sequence (prompt + output) in tokens (default: the model's limit, capped at 8192)",
    "block_size": "tokens per KV cache block",
    "kv_cache_memory": "bytes of KV cache on the CPU (default 1 GiB)",
    "kv_cache_dtype": "KV cache storage: auto (the model dtype), fp8 / fp8_e4m3 (per-layer scale, 2x the tokens "
                      "of bf16) or int8 (per token-head scales)",
    "gpu_memory_utilization": "fraction of GPU memory the engine may use",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "token budget of one step",
    "enable_chunked_prefill": "split long prompts across steps",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "structured_outputs_backend": "grammar backend for response_format / structured_outputs: auto (xgrammar, and llguidance for JSON-schema "
                                  "keywords xgrammar does not enforce), xgrammar or guidance",
    "scheduling_policy": "fcfs (arrival order) or priority (lower request priority first, then arrival; "
                         "the largest is preempted first)",
    "seed": "seed of the default random generator",
    "attention_backend": "attention implementation: auto (triton on CUDA, cpu on the CPU), torch, triton, "
                         "or cpu (C++ paged decode kernel)",
    "enforce_eager": "never capture CUDA graphs",
    "load_format": "auto, or dummy: random weights from config.json only (benchmarks)",
    "cpu_weight_prepack": "CPU: pack linear weights once in oneDNN's layout (faster small-batch matmuls)",
    "cpu_fused_ops": "CPU: C++ kernels for RMSNorm (+ residual add) and SiLU-and-mul",
    "cpu_int8_activations": "CPU: GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 layers (and GPTQ/AWQ/pack-quantized ones, repacked "
                            "into Q4_0/Q8_0) quantize decode activations to int8 per 32-value block (integer "
                            "dot products, as llama.cpp; faster, not bit-exact)",
    "cpu_gguf_tiles": "CPU: rearrange GGUF Q4_0/Q4_1/Q8_0 linear weights into 16-row tiles at load (same bytes, "
                      "faster matmuls); false keeps the on-disk row layout",
    "enable_expert_parallel": "MoE models: place whole experts on the tensor-parallel ranks (attention stays "
                              "tensor parallel); ignored, with a warning, for dense models",
    "speculative_config": "speculative decoding as a JSON object, e.g. '{\"method\": \"ngram\", "
                          "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}' (method: ngram, suffix or "
                          "draft_model with \"model\": PATH); off when not given",
    "data_parallel_size": "engine cores behind one server, each with its own scheduler, KV cache and tp x pp "
                          "ranks (pagellm serve only)",
    "enable_lora": "serve LoRA adapters (per request; see --lora-modules and /v1/load_lora_adapter)",
    "max_loras": "distinct LoRA adapters in one batch (the device's adapter slots)",
    "max_lora_rank": "largest LoRA rank accepted (slots are sized for it)",
    "max_cpu_loras": "LoRA adapters kept in host memory for swapping into slots (default: max_loras)",
    "lora_allow_bin": "accept pickled adapter_model.bin adapters (unpickling can run code)",
    "quantization": "auto: weights stay as the checkpoint stores them (GGUF blocks, or config.json's "
                    "quantization_config: gptq, awq, compressed-tensors, fp8); none: dequantize every weight at load; "
                    "fp8 / int8 on a full-precision checkpoint: quantize linear weights at load (W8A8)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_SHORT_FLAGS = {"tensor_parallel_size": ("-tp",), "pipeline_parallel_size": ("-pp",),
                "data_parallel_size": ("-dp",)}  # vLLM's short forms


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True) -> None:
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            if positional_model:
                parser.add_argument("model_pos", nargs="?", metavar="MODEL", help=_HELP["model"])
            parser.add_argument("--model", default=None, help=_HELP["model"])
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        if f.name == "speculative_config":
            base = str  # JSON text; EngineConfig parses and validates it
        help_text = f"{_HELP.get(f.name, f.name)} (default: {f.default})"
        if base is bool:
            # `--flag`, `--flag false` and `--no-flag` all work, as in vLLM.
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=None, help=help_text)
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=None, help=argparse.SUPPRESS)
        else:
            flags = [flag, *_SHORT_FLAGS.get(f.name, ())]
            parser.add_argument(*flags, type=base, default=None, help=help_text)
    parser.add_argument("--dequantize", dest="quantization", action="store_const", const="none",
                        help="expand every quantized weight to full precision at load (= --quantization none)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig kwargs from parsed flags (only those the user set)."""
    kwargs = {}
    for f in dataclasses.fields(EngineConfig):
        value = getattr(args, f.name, None)
        if f.name == "model":
            value = getattr(args, "model", None) or getattr(args, "model_pos", None)
        if value is not None:
            kwargs[f.name] = value
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    from pagellm import LLM, SamplingParams

    kwargs = engine_kwargs(args)
    llm = LLM(kwargs.pop("model", None), **kwargs)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for out in llm.generate(prompts, params, use_tqdm=not args.quiet):
        completion = out.outputs[0]
        print(f"--- prompt: {out.prompt!r}")
        print(out.prompt + completion.text if out.prompt else completion.token_ids)
        print(f"--- {len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description="pagellm: paged-KV-cache LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts (arguments, or stdin lines)")
    add_engine_args(gen, positional_model=False)
    gen.add_argument("prompts", nargs="*", help="prompts (read from stdin, one per line, if none)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """serve / chat / bench live in their own modules; each registers its sub-parser."""
    for module_name in ("pagellm.entrypoints.serve_cli", "pagellm.entrypoints.chat_cli", "pagellm.benchmarks.cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.register(sub)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagellm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
