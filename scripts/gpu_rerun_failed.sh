#!/usr/bin/env bash
# Re-runs only the steps of scripts/gpu_check.sh that did not pass, from a first run's status.tsv.
# The GPU machine's $OUT starts empty, so put the fetched status file in the checkout first:
#
#   cp <fetched>/status.tsv gpu_status_prev.tsv && scripts/gpu_rerun_failed.sh gpu_status_prev.tsv
#
# `setup` always runs (a fresh machine needs the wheels; on a warm one it takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
STATUS=${1:-gpu_status_prev.tsv}
[[ -f $STATUS ]] || { echo "no status file $STATUS (the first run's status.tsv)" >&2; exit 2; }
failed=$(awk -F'\t' '$1 != "setup" && $2 != "pass" {print $1}' "$STATUS" | tr '\n' ' ')
if [[ -z ${failed// /} ]]; then
    echo "every step in $STATUS passed: nothing to re-run"
    exit 0
fi
echo "re-running: $failed"
GPU_CHECK_STEPS="setup $failed" GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-300} exec bash scripts/gpu_check.sh
