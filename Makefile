# extmind — one Makefile for the whole local cluster.
#   make up     install what is missing, start redis + memory + embedder + generator, run the demo
#   make lint   check the protos, then ruff (lint rules and formatting; config in pyproject.toml)
#   make test   install what is missing, lint, run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The MLX build for this machine: cpu, cuda12, cuda13 or metal (scripts/mlx-backend.sh;
# EXTMIND_MLX_BACKEND overrides). The stamp names it, so a changed choice reinstalls.
MLX_BACKEND := $(shell scripts/mlx-backend.sh --name 2>/dev/null)
STAMP := $(VENV)/.installed-mlx-$(MLX_BACKEND)
GEN := extmind/v1
PROTOS := $(wildcard protos/extmind/v1/*.proto)
# Run dir of up/down/status/logs: RUN_DIR, else $EXTMIND_RUN_DIR (the variable the CLI reads), else .run
RUN_DIR ?= $(or $(EXTMIND_RUN_DIR),$(CURDIR)/.run)
export PYTHONPATH := $(CURDIR)
# MLX's CPU build on Linux bundles the reference BLAS; Debian's OpenBLAS preloaded is ~30x faster
# (docs/platform.md). Looked up when the recipe runs (make install may have just installed it).
# The CUDA and Metal builds do their matmuls on the GPU: no preload.
WITH_BLAS = $(if $(filter cpu,$(MLX_BACKEND)),LD_PRELOAD="$$(ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 2>/dev/null | head -n 1)")

.PHONY: install proto proto-check lint test test-fast up down status logs demo bench bench-memory bench-embedder bench-generator clean

install: $(STAMP) node_modules/.installed

# The venv is rebuilt only when the pinned requirements change (idempotent).
$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt pyproject.toml scripts/mlx-backend.sh
	@scripts/mlx-backend.sh >/dev/null  # an invalid EXTMIND_MLX_BACKEND stops here, in one line
	@scripts/install-system.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@# torch first and exactly pinned, so nothing pulls a CUDA build.
	$(PY) -m pip install -q $$(grep -E '^torch==' requirements-dev.txt)
	@# One MLX backend package at a time (they install the same files under mlx/): drop the others.
	@for p in mlx-cpu mlx-cuda-12 mlx-cuda-13; do \
	  [ "$$p" = "mlx-$(subst cuda,cuda-,$(MLX_BACKEND))" ] || ! $(PY) -m pip show -q $$p 2>/dev/null \
	    || $(PY) -m pip uninstall -q -y $$p; done
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt "$$(scripts/mlx-backend.sh)"
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@# setuptools boxes a notice about editable installs on every run; only that message is hidden
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q --no-deps -e .
	@rm -f $(VENV)/.installed $(VENV)/.installed-mlx-*
	@touch $@

node_modules/.installed: package.json
	@command -v npm >/dev/null || { echo "npm is needed for buf lint and the Node client test"; exit 1; }
	npm install --no-audit --no-fund --silent
	@touch $@

# The one target that generates the Python protobuf code (never edit extmind/v1/*_pb2*.py).
proto: $(STAMP)
	scripts/gen-protos.sh $(PY) .

proto-check: $(STAMP) node_modules/.installed
	./node_modules/.bin/buf lint
	@tmp=$$(mktemp -d) && scripts/gen-protos.sh $(PY) $$tmp >/dev/null && \
	  if ! diff -r -q $$tmp/$(GEN) $(GEN) -x __pycache__; then \
	    echo "generated protobuf code is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; fi; \
	  rm -rf $$tmp; echo "protos: lint clean, generated code up to date"

lint: proto-check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(WITH_BLAS) $(PY) -m pytest -q -rs tests

test-fast: install
	$(WITH_BLAS) $(PY) -m pytest -q -rs -x tests -m "not slow"

# What stops what `up` started: named at the end of `up`, the demo's outcome whatever it was.
DOWN := make down$(if $(filter-out $(CURDIR)/.run,$(RUN_DIR)), RUN_DIR=$(RUN_DIR))

up: install
	$(PY) -m extmind.cluster up --run-dir $(RUN_DIR)
	@echo "$(PY) -m extmind.demo"; $(PY) -m extmind.demo; rc=$$?; echo; \
	  echo "extmind: the cluster keeps running: make status, make logs; extmind ... (after source .venv/bin/activate);"; \
	  echo "         '$(DOWN)' stops it"; exit $$rc

down:
	@if [ -x $(PY) ]; then $(PY) -m extmind.cluster down --run-dir $(RUN_DIR); else echo "nothing to stop (no $(VENV))"; fi

status: install
	$(PY) -m extmind.cluster status --run-dir $(RUN_DIR)

logs:
	@ls $(RUN_DIR)/logs/*.log >/dev/null 2>&1 || { echo "no logs under $(RUN_DIR)/logs: run 'make up' first"; exit 1; }
	@tail -n $(or $(LINES),50) $(if $(FOLLOW),-F) $(RUN_DIR)/logs/*.log

demo: install
	$(PY) -m extmind.demo

bench: bench-memory bench-embedder bench-generator

bench-memory: install
	$(WITH_BLAS) $(PY) -m bench.memory

bench-embedder: install
	$(WITH_BLAS) $(PY) -m bench.embedder

bench-generator: install
	$(WITH_BLAS) $(PY) -m bench.generator

# What `make clean` deletes (variables, so that a test can point them elsewhere).
NODE_MODULES := node_modules
clean:
	@# First stops what `up` started from this run dir: its services and Redis keep their files there.
	@# `down` needs only the standard library: $(PYTHON) does it when the venv is broken or gone. The
	@# run dir (its pid records) is kept when neither can: else nothing could stop those processes.
	@if [ -d $(RUN_DIR)/pids ]; then \
	  { [ -x $(PY) ] && $(PY) -c 'import extmind.cluster' 2>/dev/null && $(PY) -m extmind.cluster down --run-dir $(RUN_DIR); } \
	  || $(PYTHON) -m extmind.cluster down --run-dir $(RUN_DIR) \
	  || { echo "make clean: could not stop the cluster of $(RUN_DIR) (above): nothing deleted"; exit 1; }; fi
	rm -rf $(VENV) $(NODE_MODULES) $(RUN_DIR)
