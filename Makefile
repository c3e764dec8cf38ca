# Tandem's two commands are `make demo` and `make test`; each sets up what it
# needs (a project-local virtual environment from the lock files) on its own.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MLSERVER_VENV  := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed

.PHONY: demo services test test-slow test-compose compose-images bench venv clean lint

# `make demo TLS=1`: every call over mutual TLS, with a throwaway CA (scripts/demo.py --tls).
demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(filter 1,$(TLS)),--tls)

# The trainer and the inference service in the foreground, their logs interleaved, Ctrl-C
# stops both (scripts/services.py): on an embedded Redis that keeps its data in .tandem/redis/,
# or on the Redis that REDIS_URL names (`make services REDIS_URL=redis://host:6379/0`).
services: $(STAMP)
	$(PY) scripts/services.py

test: $(STAMP)
	$(PY) -m pytest -q

# Long training runs that reproduce the seeds' accuracy figures.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The compose tier alone (also part of `make test`): docker-compose.yml, the HA set and the
# Swarm stack (deploy/swarm/) on a real Docker engine. Skipped loudly without one;
# REQUIRE_DOCKER=1 makes a missing engine fail.
test-compose: $(STAMP)
	$(PY) -m pytest -q tests/compose

# Base images for an air-gapped machine: local stand-ins for python:3.11-slim and
# redis:7 when they can be neither found nor pulled (does nothing otherwise).
compose-images:
	bash scripts/prepare_offline_images.sh

# Lint and types, settings in pyproject.toml (also run by .ci/run and .pre-commit-config.yaml):
# ruff's rules, ruff's formatter in check mode (it rewrites nothing) and mypy over the whole
# repository. All three run; any finding fails the target.
lint: $(STAMP)
	@status=0; \
	echo "$(VENV)/bin/ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "$(VENV)/bin/ruff format --check ."; $(VENV)/bin/ruff format --check . || status=1; \
	echo "$(VENV)/bin/mypy"; $(VENV)/bin/mypy || status=1; \
	exit $$status

# The serving benchmark also times Seldon MLServer (its rows are skipped without it).
bench: $(STAMP) $(VENV)/.bench-installed $(MLSERVER_STAMP)
	$(PY) -m bench

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/dev.lock
	@command -v $(PYTHON) >/dev/null || { echo "Tandem needs $(PYTHON) on PATH (or PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.bench-installed: requirements/bench.txt $(STAMP)
	$(PY) -m pip install -q -r requirements/bench.txt
	touch $@

# MLServer in a virtual environment of its own, so that its pins never touch the project's
# grpcio and protobuf; the project goes in without its dependencies, for
# bench/mlserver_runtime.py to serve a checkpoint through Tandem's forward pass.
$(MLSERVER_STAMP): requirements/bench-mlserver.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "the MLServer peer needs $(PYTHON) on PATH"; exit 1; }
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/python -m pip install -q -r requirements/bench-mlserver.txt
	$(MLSERVER_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) build *.egg-info

# Regenerate the gRPC stubs in shared/rpc/stubs/ from proto/*.proto; commit the result
# (tests/test_protos.py fails while they differ).
.PHONY: protos
protos: $(STAMP)
	$(PY) scripts/gen_protos.py
