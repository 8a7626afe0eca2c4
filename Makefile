# kbmesh — everything a user or CI runs goes through these targets.
#   make up      install what is missing, generate code, start the whole stack
#   make down    stop it (data in .kbmesh/ is kept)
#   make test    lint + type-check + buf lint + all tests
# See README.md.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench
GENERATED := build/.generated
PROTO_FILES := $(shell find protos -name '*.proto')
PYTEST_ARGS ?=

.PHONY: help venv gen browser up down run status test lint fmt bench clean distclean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(INSTALLED) ## create .venv with the project, dev tools and server binaries

$(GENERATED): $(INSTALLED) $(PROTO_FILES) devstack/codegen.py
	$(PY) -m devstack.codegen
	@touch $@

gen: $(GENERATED) ## generate Python stubs and the Envoy descriptor set from protos/

up: $(GENERATED) ## start Redis, S3, both services and Envoy in the background; returns when healthy
	$(PY) -m devstack up

down: ## stop everything `make up` started
	@if [ -x $(PY) ]; then $(PY) -m devstack down; else echo "nothing to stop (no $(VENV))"; fi

run: $(GENERATED) ## the same stack in the foreground (Ctrl-C stops it)
	$(PY) -m devstack run

status: $(GENERATED) ## show which parts of the stack are up
	$(PY) -m devstack status

lint: $(GENERATED) ## ruff (lint + format check), mypy --strict, buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

fmt: $(INSTALLED) ## format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Headless Chromium for the web page test (tests/e2e/test_web_page.py), from
# Debian's packages: Playwright drives it and never downloads a browser.
browser: ## install Debian's chromium if missing (apt-get, as root)
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "chromium is missing: run 'sudo apt-get install chromium' (or 'sudo make browser')" >&2; exit 1; fi

test: lint browser ## lint, then every test (unit, integration on real servers, e2e through Envoy)
	$(BIN)/pytest $(PYTEST_ARGS)

# Baselines the benchmarks compare against (Celery), never needed to run kbmesh.
$(BENCH_INSTALLED): $(INSTALLED) pyproject.toml
	$(PY) -m pip install --quiet -e '.[bench]'
	@touch $@

bench: $(GENERATED) $(BENCH_INSTALLED) ## run every benchmark in bench/ (each prints ratios against its baseline)
	@set -e; found=0; for b in bench/*.py; do \
	  case "$$b" in bench/_*) continue;; esac; \
	  [ -e "$$b" ] || continue; found=1; echo "== $$b"; $(PY) "$$b"; done; \
	  [ $$found = 1 ] || echo "no benchmarks in bench/ yet"

clean: ## remove generated code and caches (keeps .venv and the stack's data)
	rm -rf build kbmesh/taskmanager kbmesh/knowledge .pytest_cache .mypy_cache .ruff_cache test-artifacts
	find services devstack tests bench kbmesh -name __pycache__ -type d -exec rm -rf {} + 2>/dev/null || true

distclean: down clean ## also remove .venv and the stack's data in .kbmesh/
	rm -rf $(VENV) .kbmesh
