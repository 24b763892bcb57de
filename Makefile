# The two quick-start commands: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[demo,test,references]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) tools/demo.py --workdir runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest tests --durations=20
