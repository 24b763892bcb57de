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

# Two pytest workers, one test file each at a time (module fixtures are built once): XLA's CPU
# compilation, most of the suite's time, runs on one core per process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=20
