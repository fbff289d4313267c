# crystalc: the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_MODEL ?= examples/shakespeare/model.pt

.PHONY: venv tools demo test lint mutants clean

venv: $(VENV)/.installed

# torch first and pinned to the version whose CPU wheel this project's machines hold locally (pip's
# configuration finds it). Elsewhere PyPI's Linux torch is the multi-GB CUDA build: give
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	@PYTHON=$(PYTHON) bash scripts/ensure-tools.sh  # python3-venv too, before the venv needs it
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

tools:
	@PYTHON=$(PYTHON) bash scripts/ensure-tools.sh

demo: venv tools
	rm -rf demo-out  # ours; an older crystalc's output lacks the mark compile replaces
	$(BIN)/crystalc compile $(DEMO_MODEL) --target c -o demo-out --build
	./demo-out/model --prompt "ROMEO:" -n 300 -t 0.8 --seed 42

lint: venv
	$(BIN)/ruff check crystalc backends tests bench examples
	$(BIN)/mypy

test: venv tools lint
	$(BIN)/python -m pytest -q

# Slow (about 16 minutes here) and not part of test: can the tests fail? See scripts/mutants.txt.
mutants: venv tools
	$(BIN)/python scripts/mutants.py

clean:
	rm -rf demo-out build .pytest_cache
