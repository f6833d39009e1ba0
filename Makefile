# The two commands of the README, and the pieces they are made of.
#   make serve   install the server and serve models/repository on :8001 (gRPC), :8002 (metrics)
#   make test    install the server, its test tools and system packages, then check everything
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test bench soak install install-test install-train models system-packages check-protocol lint typecheck pytest protocol

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,test,dev]'
	touch $@

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,train,client]'
	touch $@

# The KServe Python SDK (a client the tests use) pins protobuf 6 where the server needs 7:
# it gets an environment of its own, and the tests run it as a separate process.
KSERVE_VENV ?= .venv-kserve
$(KSERVE_VENV)/.installed: | $(BIN)/python
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet kserve==0.21.0
	touch $@

install: $(VENV)/.installed-serve
install-test: $(VENV)/.installed-test $(KSERVE_VENV)/.installed
install-train: $(VENV)/.installed-train

# Retrain and re-export every model of models/repository (MiniLM included), ~2-3 minutes.
models: install-train
	$(BIN)/python -m models build $(ARGS)

serve: install
	$(BIN)/batchwise serve $(ARGS)

system-packages:
	scripts/install-system-packages

check-protocol: install-test
	$(BIN)/python scripts/generate_protocol.py --check

protocol: install-test
	$(BIN)/python scripts/generate_protocol.py

lint: install-test
	$(BIN)/ruff check service tests scripts models
	$(BIN)/ruff format --check service tests scripts models

typecheck: install-test
	$(BIN)/mypy service scripts models

pytest: install-test system-packages
	$(BIN)/python -m pytest $(ARGS)

test: check-protocol lint typecheck pytest

# The benchmark (not part of `make test`): ~40 minutes, results in bench-results/.
bench: install-test system-packages
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python scripts/benchmark.py $(ARGS)

# Soak: ~80% of capacity for MINUTES (default 10), reporting errors, p99 drift and RSS growth.
MINUTES ?= 10
soak: install-test
	$(BIN)/python scripts/soak.py --minutes $(MINUTES) $(ARGS)
