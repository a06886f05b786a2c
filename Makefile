# `make book` and `make test` install everything they need into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?=
JB_FLAGS := -W -n --keep-going

.PHONY: install book test test-fast execute lint bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## The rendered book, from the outputs stored in the notebooks (no training).
book: $(STAMP)
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "open _build/html/index.html"

## Every test: unit and math tests, every notebook re-run under the smoke profile, the book build.
test: $(STAMP)
	CONTRASTIVE_PROFILE=smoke CONTRASTIVE_PROGRESS=0 $(BIN)/python -m pytest -q tests book --nbval-lax -p no:cacheprovider
	$(BIN)/jupyter-book build . $(JB_FLAGS)

## Unit tests only, without the slow ones.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow"

## Re-run every notebook in place and store its outputs: make execute PROFILE=cpu|gpu
execute: $(STAMP)
	CONTRASTIVE_PROGRESS=0 $(BIN)/python scripts/execute_notebooks.py $(if $(PROFILE),--profile $(PROFILE),) book/*.ipynb

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check src tests scripts

bench: $(STAMP)
	$(BIN)/python -m contrastive bench augment

clean:
	rm -rf _build
