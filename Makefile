# make run  — create the virtualenv, install, migrate, serve on http://127.0.0.1:8000
# make test — create the virtualenv, install, run the whole suite
# make lint — ruff (lint and format) and mypy (with django-stubs) on chat/
# make bench — the benchmark (bench/README.md); BENCH_ARGS="--compare", "--quick", …
# make lock — compile requirements*.in to the locks requirements*.txt, which pin
#             every package; LOCK_ARGS=--upgrade moves what the .in files allow
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^pip==' requirements-dev.txt)"

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/python manage.py migrate --noinput
	DJANGO_DEBUG=$${DJANGO_DEBUG:-1} $(BIN)/daphne -b 127.0.0.1 -p 8000 chatsite.asgi:application

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

$(VENV)/.bench: requirements.txt requirements-dev.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@ $(VENV)/.dev $(VENV)/.runtime

bench: $(VENV)/.bench
	$(BIN)/python -m bench $(BENCH_ARGS)

# No index, find-links or trusted-host lines: a lock names packages, not where a
# machine fetched them. Each lock is compiled against the one below it (-c), so
# the dev lock carries the runtime pins and the bench lock the dev pins unchanged.
LOCK_FLAGS := --quiet --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links --no-emit-trusted-host
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS)

lock: $(VENV)/.dev
	$(PIP_COMPILE) $(LOCK_ARGS) -o requirements.txt requirements.in
	$(PIP_COMPILE) $(LOCK_ARGS) -o requirements-dev.txt requirements-dev.in
	$(PIP_COMPILE) $(LOCK_ARGS) -o requirements-bench.txt requirements-bench.in
