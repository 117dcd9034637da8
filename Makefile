# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Installs come from requirements.lock (every dependency pinned; `make lock` refreshes it from pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
PIP_QUIET ?= -q

.PHONY: venv test test-latest demo lint bench lock clean

$(STAMP): pyproject.toml requirements.lock constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_QUIET) --upgrade pip
	$(PIP) install $(PIP_QUIET) -c constraints.txt -r requirements.lock
	$(PIP) install $(PIP_QUIET) --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# The suite on the newest releases pyproject.toml admits (torch stays 2.13.0): run it before `make lock`,
# and whenever a dependency publishes a release, to find a break before a fresh clone does.
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -c constraints.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|peft|bitsandbytes|ray|grpcio|protobuf|accelerate|safetensors|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest

demo: $(STAMP)
	$(VENV)/bin/tandem-sim demo

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench

# Re-pin every dependency to the newest versions pyproject.toml admits (pip-tools' pip-compile).
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(PIP_QUIET) "pip-tools>=7.4,<8"
	$(LOCK_VENV)/bin/pip-compile -q --upgrade --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml
	sed -i 's/^torch==2\.13\.0+cpu$$/torch==2.13.0/' requirements.lock

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
