# Two commands: `make repro` installs and runs the pipeline on the defaults; `make test` installs and runs the tests.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test test-slow lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	pytest -q

test-slow: $(STAMP)
	pytest -q -m slow

lint: $(STAMP)
	ruff check src tests benchmarks

bench: $(STAMP)  # each prints one JSON object as its last line; train_throughput and interp read the default run
	python benchmarks/activations.py
	python benchmarks/train_throughput.py
	python benchmarks/evaluate.py
	python benchmarks/analysis.py
	python benchmarks/interp.py
	python benchmarks/compare_match.py
	python benchmarks/quality.py    # needs the peers extra (sae-lens); says so and exits 0 without it
	python benchmarks/synth.py      # long: five architectures on 1M tokens each (~40 min on 2 cores)

clean-venv:
	rm -rf $(VENV)
