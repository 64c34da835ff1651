#!/usr/bin/env bash
# The quantization issue's CPU targets, side by side in one run on one machine (about 15 minutes on
# 2 cores). Needs llama.cpp's peers: `make bench-peers` (or LLAMA_BIN pointing at llama-bench/-server).
#   bash scripts/bench_quantized_cpu.sh [RESULT_DIR]
set -euo pipefail
OUT=${1:-bench-results/quantized-cpu}
LLAMA_BIN=${LLAMA_BIN:-.peers/llama.cpp/bin}
PY=${PY:-.venv/bin/python}
PAGELLM=${PAGELLM:-.venv/bin/pagellm}
MODEL=$($PY -c "from pagellm.loader import default_model_path; print(default_model_path())")
mkdir -p "$OUT"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2); AVX-512: $(grep -o 'avx512[a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee "$OUT/machine.txt"

echo "== batch-1 decode: llama-bench tg128 vs pagellm bench latency (exact and int8 activations)"
"$LLAMA_BIN/llama-bench" -m "$MODEL" -t 2 -p 0 -n 128 -r 3 -o md | tee "$OUT/llama-bench.md"
for flags in "" "--cpu-int8-activations" "--cpu-gguf-tiles false"; do
  $PAGELLM bench latency --batch-size 1 --input-len 128 --output-len 128 --num-iters-warmup 1 --num-iters 3 \
      --max-model-len 512 --disable-tqdm --result-dir "$OUT" $flags | tail -4
done

echo "== throughput, random 64 x 128/128: quantized (default) vs fp32 (--quantization none), KV fp8"
for flags in "" "--cpu-int8-activations" "--quantization none" "--kv-cache-dtype fp8"; do
  $PAGELLM bench throughput --dataset random --num-prompts 64 --input-len 128 --output-len 128 \
      --disable-tqdm --result-dir "$OUT" $flags | tail -3
done

echo "== serving, 16 concurrent, 32 prompts of 128/128: llama-server -np 16 vs pagellm serve"
bench_serve() {
  $PAGELLM bench serve --base-url "$1" --model smollm2 --dataset random --input-len 128 --output-len 128 \
      --num-prompts 32 --max-concurrency 16 --label "$2" --result-dir "$OUT" | tail -12
}
wait_up() { for _ in $(seq 120); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }
PATH="$LLAMA_BIN:$PATH" $PY -m pagellm.benchmarks.peers llama-server --port 8081 --threads 2 --parallel 16 \
    > "$OUT/llama-server.log" 2>&1 &
PEER=$!
wait_up http://127.0.0.1:8081 && bench_serve http://127.0.0.1:8081 llama-server
kill $PEER; wait $PEER 2>/dev/null || true
for flags in "" "--cpu-int8-activations"; do
  $PAGELLM serve --port 8082 --served-model-name smollm2 --disable-uvicorn-access-log $flags > "$OUT/pagellm-serve.log" 2>&1 &
  SERVER=$!
  wait_up http://127.0.0.1:8082 && bench_serve http://127.0.0.1:8082 "pagellm${flags:+-int8}"
  kill $SERVER; wait $SERVER 2>/dev/null || true
done
