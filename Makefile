# crystalc: the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_MODEL ?= examples/shakespeare/model.pt

.PHONY: venv tools demo test lint mutants clean

venv: $(VENV)/.installed

# torch first and pinned to the version whose CPU wheel this project's machines hold locally (pip's
# configuration finds it, so it is tried without an index first). Elsewhere PyPI's Linux torch is the
# multi-GB CUDA build: give TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
TORCH := torch==2.13.0
TORCH_INDEX ?=
# tools first (order only): python3-venv is one of them, and one apt-get at a time under make -j
$(VENV)/.installed: pyproject.toml Makefile | tools
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "crystalc: needs Python >= 3.11, and $(PYTHON) is $$($(PYTHON) -V 2>&1): give make PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q $(TORCH) --index-url $(TORCH_INDEX),\
	  $(BIN)/pip install -q --no-index $(TORCH) 2>/dev/null || \
	  { echo "crystalc: $(TORCH) with its dependencies is not in pip's local wheels; installing via the index" >&2; \
	    $(BIN)/pip install -q $(TORCH); })
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

tools:
	@PYTHON=$(PYTHON) bash scripts/ensure-tools.sh

demo: venv tools
	rm -rf demo-out  # ours; an older crystalc's output lacks the mark compile replaces
	$(BIN)/crystalc compile $(DEMO_MODEL) --target c -o demo-out --build
	./demo-out/model --prompt "ROMEO:" -n 300 -t 0.8 --seed 42

lint: venv
	$(BIN)/ruff check crystalc backends tests bench examples scripts
	$(BIN)/mypy

# A worker per core (pytest-xdist), tests dealt out one by one but for the files that mark themselves
# an xdist_group: their module fixtures (trained models, built runtimes) would be built on every worker.
# PYTEST_JOBS= runs in one process.
PYTEST_JOBS ?= -n auto --dist loadgroup
test: venv tools lint
	$(BIN)/python -m pytest -q $(PYTEST_JOBS)

# Slow (about 16 minutes here) and not part of test: can the tests fail? See scripts/mutants.txt.
mutants: venv tools
	$(BIN)/python scripts/mutants.py

clean:  # what make and the tools write; .venv stays (rm -rf .venv to rebuild it)
	rm -rf demo-out build bench/work .pytest_cache .ruff_cache .mypy_cache crystalc.egg-info
