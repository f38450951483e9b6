# Two commands for a fresh clone:  make demo   and   make test
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export SHOAL_HOME ?= $(CURDIR)/.shoal
TINY   := examples/models/tiny-llama
DATA   := examples/data/tiny-sft

.PHONY: install assets demo test test-slow test-gpu gpu-check test-all clean constraints prometheus

install: $(VENV)/.installed

# torch is pinned on the command line too: unpinned, pip would fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0 -e '.[test]'
	touch $@

# The demo's tiny Llama model: built offline (tokenizer trained on the demo data), not downloaded.
assets: $(TINY)/config.json
$(TINY)/config.json: $(VENV)/.installed
	$(BIN)/python -m trainer.tiny $(TINY) --data $(DATA)/train.jsonl $(DATA)/val.jsonl

# Starts Shoal (local Ray with 8 fake H100s, SQLite, API, /metrics), submits the example job,
# follows it to the end, then stops everything.
demo: install assets
	@bash -c 'set -e; trap "$(BIN)/shoal down" EXIT; \
	  $(BIN)/shoal up; \
	  $(BIN)/shoal submit examples/tiny-lora.yaml --watch; \
	  $(BIN)/shoal queue --all'

# Debian's prometheus + promtool: the monitoring tests run a real Prometheus. Idempotent: nothing
# happens when both are on PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  command -v apt-get >/dev/null || { echo "error: prometheus/promtool not on PATH and no apt-get: install Prometheus 2.x"; exit 2; }; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; \
	fi

# The README's test command: unit tests + the real end-to-end path (Ray, SQLite, HTTP, Prometheus).
test: install assets prometheus
	$(BIN)/python -m pytest -m "not slow"

# Suites marked slow (CI runs them after `make test`); pytest's "no tests collected" (5) is fine.
test-slow: install assets
	$(BIN)/python -m pytest -m slow; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

test-all: test test-slow

# On a machine with an NVIDIA GPU: real NVML, the policy on live readings, the trainer's CUDA path
# (skipped, not failed, without a GPU; CI has none). -s prints the measured figures.
test-gpu: install assets
	$(BIN)/python -m pytest -m gpu -s -v tests/gpu

# Everything a GPU machine should measure, in one go (~6 min on an H200): the GPU tests, the memory
# estimate against real peaks, the trainer against TRL with MFU, and a profile of a packed step.
gpu-check: test-gpu
	$(BIN)/python benchmarks/memory_estimate.py
	$(BIN)/python benchmarks/trainer_vs_trl.py --gpu
	$(BIN)/python benchmarks/trainer_profile.py

constraints:
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	-$(BIN)/shoal down
	rm -rf $(SHOAL_HOME) $(TINY)
