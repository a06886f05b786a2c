# `make book` and `make test` install everything they need into $(VENV) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BOOK_STAMP := $(VENV)/.installed-book
PROFILE ?=
JB_FLAGS := -W -n --keep-going

.PHONY: install book check-html landing-table timeline test test-fast execute lint bench clean

$(STAMP): requirements.txt requirements-book.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP) $(BOOK_STAMP)

# Rendering the stored outputs needs only the book's renderer, not PyTorch: a fresh `make book` installs
# requirements-book.txt alone (about 290 MB, against 1.4 GB for everything with torch's CPU build).
$(BOOK_STAMP): requirements-book.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-book.txt
	touch $(BOOK_STAMP)

install: $(STAMP)

## The rendered book, from the outputs stored in the notebooks (no training, no PyTorch installed).
book: $(BOOK_STAMP)
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "open _build/html/index.html"

## The rendered book as a reader sees it: every page in headless Chromium (Debian's chromium and
## chromium-driver), failing on MathJax errors, raw TeX, broken images and links, console errors
## and missing chapters; screenshots in _build/screenshots. Builds the book first (incrementally).
check-html: $(STAMP) book
	$(BIN)/python scripts/check_html.py --html _build/html --toc _toc.yml --screenshots _build/screenshots \
		--figure-text warn  # until every chapter's stored figures are redrawn at the column's width

## The landing page's table of what each chapter's outputs were run on, from the notebooks' metadata.
landing-table: $(STAMP)
	$(BIN)/python scripts/landing_table.py --write

## The landing page's timeline, an SVG whose methods link to their chapters.
timeline: $(STAMP)
	$(BIN)/python scripts/make_timeline.py

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

## Lint and formatting (ruff); CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff==0.17.6  # pinned: another version may format differently
	$(BIN)/ruff check src tests scripts benchmarks book/_ext
	$(BIN)/ruff format --check src tests scripts benchmarks book/_ext
	$(BIN)/ruff format --check --line-length 88 book/*.ipynb  # code cells wrapped to the page's column

bench: $(STAMP)
	$(BIN)/python -m contrastive bench augment

clean:
	rm -rf _build
