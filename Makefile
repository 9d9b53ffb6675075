# `make train` and `make test` install into .venv/ first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA GPU (CI, laptops) stay on the CPU build of torch 2.13.0;
# elsewhere pip picks the platform's default torch. Override: make install TORCH_CONSTRAINTS=
TORCH_CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints-cpu.txt)
ARGS ?=

.PHONY: install train test smoke slow bench lint clean

$(BIN)/metarun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(BIN)/metarun

train: install
	$(BIN)/metarun train $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

smoke: install
	$(BIN)/metarun train experiment=smoke $(ARGS)

slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

bench: install
	$(BIN)/python scripts/bench.py $(ARGS)

lint: install
	$(BIN)/ruff check metarun tests scripts

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
