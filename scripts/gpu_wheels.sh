#!/usr/bin/env bash
# Builds the wheel directory scripts/gpu_check.sh installs from on a GPU machine without network.
# Run it on a machine with network access, from the repository root:
#
#   scripts/gpu_wheels.sh                 # -> .gpu-wheels/ (git-ignored; carry it to the GPU machine)
#   WHEEL_DIR=/tmp/w PYTHONS="3.11 3.12" scripts/gpu_wheels.sh
#
# The GPU machine is assumed to have torch, triton, transformers and their own dependencies (numpy,
# pyyaml, tqdm, requests, jinja2, ...): those are never downloaded, so nothing here can replace its
# CUDA torch. Everything else pagellm and its GPU tests import is resolved with pip for each Python
# in PYTHONS (the GPU machine's Python is not known in advance): pure-Python wheels are shared,
# compiled ones (pydantic-core) come once per Python; each Python's resolved pins are kept beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEEL_DIR=${WHEEL_DIR:-.gpu-wheels}
PYTHONS=${PYTHONS:-"3.10 3.11 3.12 3.13"}
# At most the versions the test suite passes with: exactly those where the Python allows, else the newest before.
PACKAGES=("gguf<=0.19.0" "fastapi<=0.165.0" "uvicorn<=0.54.0" "prometheus-client<=0.26.0" "ninja<=1.13.2" "httpx<=0.28.1"
          "pytest<=9.2.0" "pytest-timeout<=2.4.0" "pytest-xdist<=3.8.0")
# Present wherever torch + transformers are installed; downloading them would only bloat the directory.
# Small pure-Python ones (packaging, typing-extensions, idna, certifi) come anyway: the machine's may be too old.
PROVIDED="torch triton transformers tokenizers safetensors huggingface-hub hf-xet numpy pyyaml tqdm requests urllib3
charset-normalizer jinja2 markupsafe filelock fsspec sympy mpmath networkx regex setuptools"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

mkdir -p "$WHEEL_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for version in $PYTHONS; do
    # The dependency closure for this Python, as pip resolves it (nothing is installed).
    "$PY" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: --python-version "$version" \
        "${PLATFORMS[@]}" --target "$tmp/target" --report "$tmp/report-$version.json" "${PACKAGES[@]}"
    "$PY" - "$tmp/report-$version.json" "$PROVIDED" > "$tmp/pins-$version.txt" <<'EOF'
import json, re, sys
provided = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if re.sub(r"[-_.]+", "-", meta["name"]).lower() not in provided:
        print(f"{meta['name']}=={meta['version']}")
EOF
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" "${PLATFORMS[@]}" \
        --dest "$WHEEL_DIR" -r "$tmp/pins-$version.txt"
    cp "$tmp/pins-$version.txt" "$WHEEL_DIR/"
    echo "python $version: $(wc -l < "$tmp/pins-$version.txt") packages"
done
# What gpu_check.sh installs (by name; pip keeps whatever the machine already has).
printf '%s\n' "${PACKAGES[@]}" | sed 's/[<=].*//' > "$WHEEL_DIR/requirements.txt"
du -sh "$WHEEL_DIR"
ls "$WHEEL_DIR"
