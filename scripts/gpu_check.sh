#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the GPU tests (kernels at full shapes, engine
# parity, CUDA graphs on/off), the kernel and decode-step measurements, and the end-to-end
# benchmarks on the Llama-3.1-8B shape with dummy weights. Results land in $OUT_DIR.
#
#   scripts/gpu_check.sh            # from the repository root, after `make venv`
#   OUT_DIR=/tmp/gpu scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-gpu_results}
MODEL=${MODEL:-configs/llama-3.1-8b}
mkdir -p "$OUT_DIR"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT_DIR/versions.txt"

echo "== GPU tests"
"$PY" -m pytest -q -ra tests/test_triton_attention.py tests/test_gpu_engine.py tests/test_gpu_memory.py \
    tests/test_dummy_load.py 2>&1 | tee "$OUT_DIR/tests.txt"

echo "== kernels and one decode step against the roofline"
"$PY" -m pagellm.attention.triton_bench --model "$MODEL" --out "$OUT_DIR/triton_bench.json" \
    2>&1 | tee "$OUT_DIR/triton_bench.md"

echo "== end-to-end benchmarks ($MODEL, dummy weights, bf16; the config dir has no tokenizer)"
PAGELLM=${PAGELLM:-.venv/bin/pagellm}
DUMMY=(--model "$MODEL" --load-format dummy --skip-tokenizer-init --result-dir "$OUT_DIR")
"$PAGELLM" bench throughput "${DUMMY[@]}" --dataset random --num-prompts 1000 --input-len 512 --output-len 128 \
    --backend pagellm,hf --hf-batch-size 64,128,256 --hf-max-batches 2 2>&1 | tee "$OUT_DIR/throughput_512_128.txt"
"$PAGELLM" bench throughput "${DUMMY[@]}" --dataset sharegpt-like --num-prompts 1000 \
    --backend pagellm,hf --hf-batch-size 64,128,256 --hf-max-batches 2 2>&1 | tee "$OUT_DIR/throughput_sharegpt.txt"
for eager in "" --enforce-eager; do
    "$PAGELLM" bench latency "${DUMMY[@]}" $eager --batch-size 1 --input-len 128 --output-len 128 \
        2>&1 | tee "$OUT_DIR/latency_bs1${eager}.txt"
done
echo "results in $OUT_DIR"
