# envctl — the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
ENVCTL := $(VENV)/bin/envctl
PYTEST := $(VENV)/bin/python -m pytest
# Where `make test` keeps the database it uses to check the base images are built.
TEST_DATA := .data/test-setup

.PHONY: run test bench lint setup base-images kube-build-background clean

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

# The test cluster's Kubernetes build (about 7 minutes the first time on a machine, cached in
# /var/cache/envctl/kube-1.20.2) starts first, in the background, beside the base images and the
# tests that do not need it; the first test that needs the cluster waits for it (the cache's lock).
kube-build-background: setup
	@mkdir -p .data
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "test: building the test cluster's Kubernetes in the background (log: .data/kube-build.log)"; \
	  (nice -n 10 scripts/kube-fixture build >.data/kube-build.log 2>&1 &); \
	fi

# The same set-up, then the whole suite against real Docker, SQLite, PostgreSQL and Kubernetes.
test: kube-build-background base-images
	$(PYTEST) tests --ignore=tests/bench $(PYTEST_ARGS)

# Benchmarks: each figure beside its baseline measured in the same run.
bench: base-images
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check envs runner registry api tests
	$(VENV)/bin/mypy

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
