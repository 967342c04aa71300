# The two commands the README promises: `make run` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest lists the suite's ten slowest tests after every run; `make test PYTEST_ARGS=-x` adds to it
override PYTEST_ARGS := --durations=10 $(PYTEST_ARGS)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-tune.txt requirements-serve.txt requirements-dev.txt jenkins/requirements.txt | sha256sum | cut -c1-12)

.PHONY: venv run train test test-slow test-all lint bench clean

$(STAMP): requirements.txt requirements-tune.txt requirements-serve.txt requirements-dev.txt jenkins/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# The whole chain on a local git repository (this checkout by default); see README "Settings".
run: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" scripts/pipeline.sh

# One training run into ./out, without the pipeline around it.
train: venv
	$(PY) train.py --out out $(TRAIN_ARGS)

# One pytest-xdist worker per core, each pinned to its core (tests/conftest.py): the trainings the
# tests start share the cores instead of oversubscribing them.
test: venv
	$(PY) -m pytest -n auto --dist worksteal $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

lint: venv
	$(VENV)/bin/ruff check .
	shellcheck scripts/*.sh .ci/run

bench: venv
	$(PY) bench/train_speed.py

clean:
	rm -rf out .pytest_cache .ruff_cache
