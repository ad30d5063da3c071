# The one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed

GEN_DIR := clients/python/src
PROTO_FILES := $(shell find proto -name '*.proto' | sort)

DESCRIPTOR := build/kv.pb

export KV_HOST ?= 127.0.0.1
export KV_PORT ?= 50051
export KV_REST_PORT ?= 8080
export KV_ADMIN_PORT ?= 9901

.PHONY: certs test-security test-e2e help setup generate check-generated descriptor polyglot-deps test-polyglot test-hostile-long cluster-deps cluster test-cluster lint typecheck test test-fast run run-grpc bench verify fix clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): constraints.txt requirements-dev.txt clients/python/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt -e clients/python -e server
	touch $@

setup: $(STAMP) ## Create .venv with the server, the client and the tools (pinned)

generate: $(STAMP) $(DESCRIPTOR) polyglot-deps ## Regenerate every client's stubs and docs/openapi from proto/
	$(PY) scripts/generate.py
	$(PY) scripts/generate_polyglot.py
	$(PY) scripts/openapi.py

check-generated: $(STAMP) $(DESCRIPTOR) ## Fail if the generated code is not what `make generate` writes
	$(PY) scripts/generate.py --check
	$(PY) scripts/openapi.py --check

$(DESCRIPTOR): $(PROTO_FILES) $(STAMP)
	$(PY) scripts/generate.py --descriptor $@

descriptor: $(DESCRIPTOR) ## Build the descriptor set the REST gateway transcodes with

cluster-deps: ## Install etcd 3.4 for cluster mode (Debian etcd-server, etcd-client; idempotent)
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client; }

NODES ?= 3
CLUSTER_ARGS ?=

cluster: $(STAMP) $(DESCRIPTOR) cluster-deps ## Local cluster: NODES etcd members, kv servers, REST gateways and a front gateway over all of them (NODES=3 or 5)
	$(PY) scripts/cluster.py --nodes $(NODES) $(CLUSTER_ARGS)

test-cluster: $(STAMP) $(DESCRIPTOR) cluster-deps ## Cluster tests: etcd store, cross-node REST reads, faults, watch resume, front gateway
	$(BIN)/pytest tests/cluster

polyglot-deps: ## Install the TypeScript and Go toolchains (Debian packages, npm ci; idempotent)
	scripts/install-polyglot-deps.sh

certs: $(STAMP) ## Make a local CA, a server certificate (localhost, 127.0.0.1, ::1) and a client certificate in build/certs
	$(PY) scripts/certs.py --out build/certs

test-security: $(STAMP) $(DESCRIPTOR) ## TLS, tokens, limits, metrics (real kv-server and Envoy processes)
	$(BIN)/pytest tests/security

test-e2e: $(STAMP) $(DESCRIPTOR) ## REST end to end: the real Envoy in front of the real kv-server
	$(BIN)/pytest tests/e2e

test-polyglot: $(STAMP) $(DESCRIPTOR) polyglot-deps ## The contract from TypeScript, Go and grpcurl against a real server
	$(BIN)/pytest tests/polyglot

# buf breaking builds the baseline like proto/, with the local google/api module (see buf.yaml).
BUF_BASELINE := {"version":"v2","modules":[{"path":"proto-baseline"},{"path":"build/googleapis"}]}

lint: $(STAMP) ## ruff, layering contracts, buf lint and buf breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	VENV=$(VENV) scripts/buf.sh lint
	VENV=$(VENV) scripts/buf.sh breaking proto --against proto-baseline --against-config '$(BUF_BASELINE)'

typecheck: $(STAMP) ## mypy --strict over the server, the client and the tests
	$(BIN)/mypy

test: $(STAMP) $(DESCRIPTOR) polyglot-deps cluster-deps ## The whole test suite (what CI runs)
	$(MAKE) --no-print-directory check-generated lint typecheck
	$(BIN)/pytest

test-fast: $(STAMP) $(DESCRIPTOR) polyglot-deps cluster-deps ## The test suite without the slow crash and restart tests
	$(BIN)/pytest -m "not slow"

run: $(STAMP) $(DESCRIPTOR) ## Serve gRPC on :50051 and REST on :8080 (Envoy), SQLite store in ./data/kv.db
	$(PY) scripts/serve.py

run-grpc: $(STAMP) ## Serve gRPC only, without the REST gateway
	$(BIN)/kv-server

KV_CRASH_CYCLES ?= 500
KV_MODEL_EXAMPLES ?= 500

test-hostile-long: $(STAMP) ## Fuzzing, store model and kill -9 loop, longer (needs root for the tmpfs)
	KV_CRASH_CYCLES=$(KV_CRASH_CYCLES) KV_MODEL_EXAMPLES=$(KV_MODEL_EXAMPLES) $(BIN)/pytest tests/hostile --timeout=0

BENCH_ARGS ?=

bench: $(STAMP) ## Benchmark kv against etcd 3.4 on this machine (h2load); BENCH_ARGS="--rounds 3"
	bench/install-deps.sh
	$(PY) bench/run.py $(BENCH_ARGS)

verify: test ## What CI runs

fix: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## Remove the virtualenv and caches (keeps ./data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build clients/typescript/node_modules clients/typescript/dist
