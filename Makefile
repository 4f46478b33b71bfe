# One command runs the service on a local stack (`make run`); one command runs the tests (`make test`).
# Everything a fresh machine needs beyond Python 3.11+, Java 17+ (21+ for the Schema Registry), Maven and Go is
# installed from here.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv lint format test test-unit kafka-up kafka-down registry-up registry-down run bench helm clean

help:
	@echo "make run        start the local stack (broker, emulator, relay, traffic generator); Ctrl-C stops it"
	@echo "make test       lint, then the whole test suite against a real local Kafka broker"
	@echo "make test-unit  only the fast tests that need no broker"
	@echo "make lint       ruff and mypy --strict"
	@echo "make kafka-up   start a local broker in the background (make kafka-down stops it)"
	@echo "make registry-up  start a local Schema Registry in the background (make registry-down stops it)"
	@echo "make bench      the benchmark (about 10 minutes); writes BENCHMARKS.md"
	@echo "make helm       build Helm into the cache (once) and lint the chart in deploy/helm/rr-consumer"

venv: $(STAMP)

# Reinstall when the dependency pins change.
$(STAMP): pyproject.toml dev/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -e ./dev
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check consumer dev tests tools
	$(VENV)/bin/ruff format --check consumer dev tests tools
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format consumer dev tests tools
	$(VENV)/bin/ruff check --fix consumer dev tests tools

# The broker tool starts a broker (unless KAFKA_BOOTSTRAP_SERVERS is set), the registry tool a Schema Registry
# (unless SCHEMA_REGISTRY_URL is set); pytest runs with both addresses, both are stopped whatever pytest's
# outcome, and the exit status is pytest's. One broker and one registry for the whole run.
# Helm (for tests/test_helm.py) is built once into the cache; on a fresh machine that build (about 2 minutes
# of CPU) starts here in the background, niced, so it overlaps the suite instead of adding to it. The tests
# wait for it (tools/helm.sh holds a lock); if it failed, their own call builds again and says why.
test: lint
	nice -n 19 bash tools/helm.sh >/dev/null 2>&1 &
	$(PY) -m tools.kafka_local run -- $(PY) -m tools.registry_local run -- $(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

kafka-up: venv
	$(PY) -m tools.kafka_local up

kafka-down: venv
	$(PY) -m tools.kafka_local down

registry-up: venv
	$(PY) -m tools.registry_local up

registry-down: venv
	$(PY) -m tools.registry_local down

run: venv
	$(PY) -m tools.local_stack

# The full benchmark (about 10 minutes): writes BENCHMARKS.md. Not part of `make test`.
bench: venv
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m tools.bench

helm:
	bash tools/helm.sh
	"$$(bash tools/helm.sh)" lint --strict deploy/helm/rr-consumer
	"$$(bash tools/helm.sh)" lint --strict deploy/helm/rr-consumer -f deploy/helm/rr-consumer/ci/all-on-values.yaml

clean:
	-$(PY) -m tools.kafka_local down
	-$(PY) -m tools.registry_local down
	rm -rf $(VENV) .kafka .registry .pytest_cache .mypy_cache .ruff_cache
