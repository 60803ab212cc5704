# One-command set-up: `make demo` and `make test` create .venv and install everything.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt

.PHONY: demo test lint typecheck pytest chromium serve experiments experiments-other bench bench-peers bench-single-model clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The constraints pin torch to the 2.13.0 CPU build: without them pip would pick a
	# multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

# Browser tests drive Debian's chromium; install it when missing (needs root or sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict monitor_agent server

pytest: $(STAMP) chromium
	$(BIN)/python -m pytest -q -ra

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/channelscope demo

serve: $(STAMP)
	$(BIN)/channelscope serve

experiments: $(STAMP)
	$(BIN)/python -m experiments.run_all

# The alarm's defaults on two tasks they were not chosen on (~11 min on 2 cores).
experiments-other: $(STAMP)
	$(BIN)/python -m experiments.other_tasks

bench: $(STAMP)
	$(BIN)/python bench/agent_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts

# Peers for the overhead benchmark live in their own venv, installed with the torch
# constraint (cockpit needs setuptools<81).
.venv-peers/.installed: pyproject.toml constraints.txt
	test -x .venv-peers/bin/python || $(PY) -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet --upgrade pip
	.venv-peers/bin/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[agent]' "setuptools<81" \
	  backpack-for-pytorch cockpit-for-pytorch wandb
	touch .venv-peers/.installed

bench-peers: .venv-peers/.installed
	.venv-peers/bin/python bench/agent_overhead.py --peers

# Equal cadence in a process that trains one model, beside BackPACK, with torch ops and the CPU kernels (~6.5 min each).
bench-single-model: .venv-peers/.installed
	.venv-peers/bin/python bench/single_model.py
	.venv-peers/bin/python bench/single_model.py --steady-heap \
	  --out bench/results/single_model_steady_heap.md
