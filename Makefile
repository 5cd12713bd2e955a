# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
# These machines ship torch 2.14.1 + torchvision 0.29.1 on local disk (a matching pair; torch
# 2.13.0 with PyPI's torchvision fails to import). Override elsewhere, e.g. TORCH_PACKAGES=torch.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint docs bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_PACKAGES)
	touch $@

demo: setup
	$(BIN)/landcover-train experiment=demo

# one pytest-xdist worker per core, whole files per worker (module fixtures built once)
test: setup
	$(BIN)/python -m pytest -n auto --dist loadfile

# the inner loop: everything not marked slow (end to end) or shared (the real data)
test-fast: setup
	$(BIN)/python -m pytest -n auto --dist loadfile -m "not slow and not shared"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# the documentation site; --strict: a broken link or a page missing from the nav fails
docs: setup
	$(BIN)/mkdocs build --strict --quiet --site-dir site

bench: setup
	$(BIN)/python experiments/bench_loader.py

clean:
	rm -rf $(VENV) outputs multirun data/synthetic site
