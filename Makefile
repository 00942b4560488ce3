# make book     install everything into .venv and render the book (book/_build/html)
# make test     install everything into .venv and run the test suite
# make chapter NB=04_audit PARAMS="-p n_positions 50"   re-execute one chapter, rebuild the HTML
PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel, never a CUDA build pulled in by another package
	@echo "installing torch 2.13.0 (CPU wheel) into $(VENV)"
	$(BIN)/pip install --quiet torch==2.13.0
	@echo "installing moeaudit and its pinned packages into $(VENV) (one line per package)"
	set -o pipefail; $(BIN)/pip install --progress-bar off -e '.[test]' | { grep --line-buffered -E '^(Collecting|Successfully)' || true; }
	touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(BIN)/python -m moeaudit.tooling.book build

html: $(STAMP)
	$(BIN)/python -m moeaudit.tooling.book build --no-execute

chapter: $(STAMP)
	$(BIN)/python -m moeaudit.tooling.book chapter $(NB) $(PARAMS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

models: $(STAMP)
	for m in $$($(BIN)/python -c "from moeaudit.zoo import SHIPPED_MODELS; print(*SHIPPED_MODELS)"); do \
		$(BIN)/python -m moeaudit.tooling.training $$m || exit 1; done

clean-results:
	rm -rf results book/_build

.PHONY: install book html chapter test models clean-results
