# The two entry points of the project (see README):
#   make demo   set up .venv and run the nightly generation flow offline on embedded defaults
#   make test   set up .venv with the extras and run the test suite
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PIPOPT := --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint install install-dev clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: left to the resolver, other packages would pull a multi-GB CUDA build.
# The migrated Prefect database a first run starts from (flows/server.py): ~20 s here, not in it.
$(VENV)/.core: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install $(PIPOPT) torch==2.13.0
	$(PIP) install $(PIPOPT) -e .
	$(VENV)/bin/python -m flows.server template
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install $(PIPOPT) -e '.[train,dev]'
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/awm demo

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Mistakes, not style (the rules are in pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .awm .pytest_cache
