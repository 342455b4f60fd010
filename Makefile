# Entry points. `make demo` and `make test` work on a fresh machine (they set everything up).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup binaries node-prep demo test lint unit bench clean

# The image the real-node tests install the chart with (built from ./Dockerfile, never pushed).
MIG_GUARD_IMAGE := mig-guard.local/mig-guard:dev

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Builds (or reuses from the cache) kube-apiserver, etcd, kwok, kubectl, helm.
binaries: $(STAMP)
	$(BIN)/python -m devcluster.binaries ensure

# A real node's Debian packages (apt-get, as root: containerd, runc, CNI plugins, iptables, buildah,
# mmdebstrap, ...) and images (pause, a Debian base, ./Dockerfile built with buildah). Cached.
node-prep: binaries
	$(BIN)/python -m devcluster.node prepare --image $(MIG_GUARD_IMAGE)=.

demo: binaries
	$(BIN)/mig-guard demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -m "not cluster" -q

# Tests run in parallel (pytest-xdist): one worker per CPU, at least 2 (most tests wait on API
# servers and kubelets, not on the CPU). Each test file runs on one worker, the real-node tests
# (tests/realnode/) all on one, first (devcluster.pytest_plugin). TEST_WORKERS=0: no workers.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -lt 2 ] && n=2; echo $$n)

test: lint binaries node-prep
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
