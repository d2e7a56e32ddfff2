# Two commands set up a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install quickstart test lint clean

# torch first, pinned: it takes the local CPU wheel; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/petra search search_spaces/quickstart.yaml

lint: install
	$(BIN)/ruff check petra tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs/mlflow.db runs/artifacts runs/cache
