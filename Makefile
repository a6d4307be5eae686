# envctl — the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
ENVCTL := $(VENV)/bin/envctl
PYTEST := $(VENV)/bin/python -m pytest
# Where `make test` keeps the database it uses to check the base images are built.
TEST_DATA := .data/test-setup

.PHONY: run test bench lint setup base-images clean

setup:
	scripts/setup

# Install what is missing, build the base images once, serve on 127.0.0.1:8700.
run: setup
	$(ENVCTL) db upgrade
	$(ENVCTL) base build
	exec $(ENVCTL) serve

base-images: setup
	ENVCTL_DATA_DIR=$(TEST_DATA) $(ENVCTL) db upgrade >/dev/null
	ENVCTL_DATA_DIR=$(TEST_DATA) $(ENVCTL) base build

# The same set-up, then the whole suite against real Docker, SQLite and PostgreSQL.
test: base-images
	$(PYTEST) tests --ignore=tests/bench $(PYTEST_ARGS)

# Benchmarks: each figure beside its baseline measured in the same run.
bench: base-images
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check envs runner registry api tests
	$(VENV)/bin/mypy

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
