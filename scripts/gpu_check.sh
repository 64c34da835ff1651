#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one command that fits in 7 minutes on a bare H200 machine:
# GPU tests at full shapes, then short benchmarks on the Llama-3.1-8B shape with dummy bf16 weights.
# Each step runs under its own timeout, clamped to what is left of GPU_CHECK_BUDGET_S, so a hang
# costs one step. Results land in $OUT: summary.md (written last), status.tsv, results.json, logs.tgz.
#
#   scripts/gpu_wheels.sh                      # once, with network: .gpu-wheels/ for a machine without it
#   OUT=/tmp/gpu scripts/gpu_check.sh          # on the GPU machine, from the repository root
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh   # no GPU: the same plumbing with CPU-sized steps
#   GPU_CHECK_STEPS="setup latency" scripts/gpu_check.sh   # some steps only (scripts/gpu_rerun_failed.sh)
#
# The machine is expected to have torch, triton and transformers; whatever else pagellm and its tests
# import is installed from the wheel directory without network, and pagellm runs from this checkout
# (PYTHONPATH), so no pip command here can touch the machine's torch.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu_results}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
STEPS=${GPU_CHECK_STEPS:-"setup gpu_tests engine_tests kernel throughput latency coldstart memory"}
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
MODEL=${MODEL:-configs/llama-3.1-8b}
LOGS=$OUT/logs
mkdir -p "$LOGS"
OUT=$(cd "$OUT" && pwd) LOGS=$(cd "$LOGS" && pwd)
: > "$OUT/status.tsv"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PY OUT LOGS DRY WHEELS MODEL
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$(date +%s)
RESERVE_S=15  # for the summary and the log archive

pagellm() { "$PY" -m pagellm.entrypoints.cli "$@"; }
# The engine arguments every benchmark step shares: the 8B config directory, dummy weights, bf16.
bench_model_args() {
    if [[ $DRY == 1 ]]; then
        echo --model "$LOGS/tiny-llama" --load-format dummy --skip-tokenizer-init --device cpu --max-model-len 512
    else
        echo --model "$MODEL" --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
    fi
}

# -- the steps (each runs in its own bash under `timeout`; stdout+stderr go to logs/<step>.log) ---------------
step_setup() {
    if [[ $DRY == 1 ]]; then
        # A scratch venv stands in for the GPU machine: the packages torch + transformers bring come from the
        # index, pagellm's own from the wheel directory, offline, exactly as on the machine.
        local venv=$LOGS/scratch-venv
        python3 -m venv "$venv" && "$venv/bin/pip" install -q numpy pyyaml tqdm requests || return 1
        "$venv/bin/pip" install --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || return 1
        "$venv/bin/python" -c "import gguf, fastapi, uvicorn, prometheus_client, ninja, httpx, pytest, xdist, pytest_timeout; print('wheel install: imports ok')" || return 1
        "$PY" -c "
from transformers import LlamaConfig
LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024).save_pretrained('$LOGS/tiny-llama')" || return 1
        "$PY" scripts/gpu_check_steps.py env --device cpu --json "$LOGS/env.json"
        return
    fi
    nvidia-smi || return 1
    "$PY" -m pip install --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || return 1
    "$PY" scripts/gpu_check_steps.py env --json "$LOGS/env.json"
}

step_gpu_tests() {  # the kernels at full shapes; compilation dominates, so cases compile in parallel
    local workers=8
    [[ $DRY == 1 ]] && workers=2
    "$PY" -m pytest -q -ra -p no:cacheprovider -n "$workers" --timeout 100 --junitxml "$LOGS/gpu_tests.xml" \
        tests/test_triton_attention.py tests/test_triton_quant_matmul.py
}

step_engine_tests() {  # engine parity triton + graphs vs torch eager, graphs on/off, memory arithmetic, dummy load
    "$PY" -m pytest -q -ra -p no:cacheprovider --timeout 70 --junitxml "$LOGS/engine_tests.xml" \
        tests/test_gpu_engine.py tests/test_gpu_memory.py tests/test_dummy_load.py
}

step_kernel() {  # copy bandwidth, bf16 matmul rate, decode attention at batch 64 x 2k
    if [[ $DRY == 1 ]]; then
        TRITON_INTERPRET=1 "$PY" scripts/gpu_check_steps.py kernel --device cpu --batch 2 --context 64 \
            --json "$LOGS/kernel.json"
    else
        "$PY" scripts/gpu_check_steps.py kernel --batch 64 --context 2048 --json "$LOGS/kernel.json"
    fi
}

step_throughput() {  # in 512 / out 128, 200 prompts; HF generate at two batch sizes in the same run
    local sizes=(--num-prompts 200 --input-len 512 --output-len 128 --hf-batch-size 64,128)
    [[ $DRY == 1 ]] && sizes=(--num-prompts 8 --input-len 32 --output-len 8 --hf-batch-size 4,8)
    # shellcheck disable=SC2046
    pagellm bench throughput $(bench_model_args) --dataset random "${sizes[@]}" --backend pagellm,hf \
        --hf-max-batches 1 --disable-tqdm --result-dir "$LOGS/throughput"
}

step_latency() {  # batch 1, in 128 / out 128, CUDA graphs on (the default)
    local sizes=(--input-len 128 --output-len 128)
    [[ $DRY == 1 ]] && sizes=(--input-len 16 --output-len 8)
    # shellcheck disable=SC2046
    pagellm bench latency $(bench_model_args) --batch-size 1 "${sizes[@]}" --num-iters-warmup 1 --num-iters 3 \
        --disable-tqdm --result-dir "$LOGS/latency"
}

step_coldstart() {  # `pagellm serve` on the dummy 8B: launch -> healthy -> first token; graph capture seconds
    # shellcheck disable=SC2046
    "$PY" scripts/gpu_check_steps.py coldstart --json "$LOGS/coldstart.json" -- $(bench_model_args) \
        --served-model-name dummy-8b
}

step_memory() {  # KV pool vs gpu_memory_utilization x total - measured peak, within 5%
    if [[ $DRY == 1 ]]; then  # needs CUDA memory statistics: only the argument parsing runs here
        "$PY" scripts/gpu_check_steps.py memory --help
    else
        "$PY" scripts/gpu_check_steps.py memory --model "$MODEL" --gpu-memory-utilization 0.9 \
            --json "$LOGS/memory.json"
    fi
}
export -f pagellm bench_model_args step_setup step_gpu_tests step_engine_tests step_kernel step_throughput \
    step_latency step_coldstart step_memory

# -- the runner --------------------------------------------------------------------------------------------
SETUP_FAILED=0
run_step() {  # NAME BUDGET_S: runs step_NAME if selected, records "name status seconds rc limit" in status.tsv
    local name=$1 budget=$2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local left=$((BUDGET_S - ($(date +%s) - START) - RESERVE_S))
    if ((SETUP_FAILED)); then
        printf '%s\tnot run (setup failed)\t0\t-\t%s\n' "$name" "$budget" >> "$OUT/status.tsv"; return 0
    fi
    if ((left < 10)); then
        printf '%s\tnot run (time budget spent)\t0\t-\t%s\n' "$name" "$budget" >> "$OUT/status.tsv"; return 0
    fi
    local limit=$((budget < left ? budget : left)) t0 rc status
    echo "== $name (limit ${limit} s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "step_$name" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124|137) status=timeout ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$rc" "$limit" >> "$OUT/status.tsv"
    echo "   $status in $(($(date +%s) - t0)) s; last lines:"
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
    [[ $name == setup && $status != pass ]] && SETUP_FAILED=1
    return 0
}

# Budgets (s) sum to more than GPU_CHECK_BUDGET_S on purpose: typical runs take about two thirds of
# each; the clamp to what is left keeps the whole run inside the budget even when one step hangs.
run_step setup 45
run_step gpu_tests 110
run_step engine_tests 75
run_step kernel 35
run_step throughput 100
run_step latency 45
run_step coldstart 60
run_step memory 50

"$PY" scripts/gpu_summary.py --out "$OUT" --dry-run "$DRY"
rm -rf "$LOGS/scratch-venv"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
echo "total $(($(date +%s) - START)) s; results in $OUT (summary.md, status.tsv, results.json, logs.tgz)"
cat "$OUT/summary.md"
