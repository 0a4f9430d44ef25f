# narthex: the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
# The uv on PATH if there is one, else a private copy installed from PyPI on first use.
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
MEMBERS := pyproject.toml libs/common/pyproject.toml gateway/pyproject.toml \
	services/auth/pyproject.toml services/features/pyproject.toml \
	services/inference/pyproject.toml services/analytics/pyproject.toml cli/pyproject.toml \
	libs/transactions/pyproject.toml libs/testing/pyproject.toml loadtests/pyproject.toml

.PHONY: help run test test-tools test-containers images lint format bench bench-peers loadtest models install clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: install ## Start the whole platform locally; prints URLs and a curl line that works
	$(UV) run narthex up

test: install lint models test-tools ## Install everything, then lint, type-check and run every test
	$(UV) run pytest

test-tools: ## Debian's redis-server and postgresql (test servers when none runs); prometheus, docker-compose, chromium (tests of them skip without; CI fails)
	@command -v prometheus >/dev/null || { echo "installing prometheus (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends prometheus >/dev/null) \
		|| echo "could not install prometheus: tests/mesh/test_gate.py will skip it"; }
	@command -v docker-compose >/dev/null || { echo "installing docker-compose (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends docker-compose >/dev/null) \
		|| echo "could not install docker-compose: tests/deploy/test_compose.py will skip it"; }
	@test -x /usr/bin/chromium || { echo "installing chromium (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium >/dev/null) \
		|| echo "could not install chromium: tests/e2e/test_dashboard.py will skip it"; }
	@command -v redis-server >/dev/null || { echo "installing redis-server (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server >/dev/null) \
		|| echo "could not install redis-server: pytest stops unless a Redis answers at NARTHEX_TEST_REDIS_URL"; }
# Debian keeps initdb and postgres off PATH, in /usr/lib/postgresql/<version>/bin.
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 \
		|| { echo "installing postgresql (Debian package)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null) \
		|| echo "could not install postgresql: pytest stops unless a PostgreSQL answers at NARTHEX_TEST_POSTGRES_URL"; }

# LOCAL_BASE=1: no Docker Hub, no PyPI from a build (this project's CI machines): debootstrapped
# base images and a wheelhouse from uv.lock, made first (deploy/compose/make-base.sh, wheelhouse.sh).
ifdef LOCAL_BASE
IMAGE_ENV := BASE_IMAGE=narthex-base/python:3.11-bookworm UV_IMAGE=narthex-base/uv:$(UV_VERSION) \
	INFRA_BASE_IMAGE=narthex-base/infra:bookworm
IMAGE_PREP := deploy/compose/make-base.sh && deploy/compose/wheelhouse.sh &&
endif

images: install models ## Build the container images, tagged with the commit (needs docker; LOCAL_BASE=1, see above)
	export UV=$(UV) $(IMAGE_ENV); $(IMAGE_PREP) deploy/compose/build.sh

test-containers: install models ## Build the images, run docker-compose.yml end to end, tear down (LOCAL_BASE=1 as for images)
	export UV=$(UV) $(IMAGE_ENV); $(IMAGE_PREP) $(UV) run pytest tests/deploy -m containers -s

lint: install ## ruff (lint + format check) and mypy --strict on the whole tree
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format: install ## Apply ruff's fixes and formatting
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

bench: install ## Benchmarks (needs wrk, redis-server: apt-get install); prints ratios against baselines
	@command -v wrk >/dev/null || { echo "installing wrk (Debian package)"; \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(UV) run python -m bench.proxy
	$(UV) run python -m bench.identity
	$(UV) run python -m bench.limits
	$(UV) run python -m bench.inference
	$(UV) run python -m bench.fairness
	$(UV) run python -m bench.features
	$(UV) run python -m bench.analytics

# `make loadtest` options: the gateway (default: the running stack of .state, or one started
# for the run on PORT_BASE and up), how long, how many users, how fast they arrive, the
# scenario and the SLA (a file, or a name in loadtests/scenarios and loadtests/sla), Locust
# worker processes.
URL ?=
PORT_BASE ?= 8000
DURATION ?= 60s
USERS ?= 12
SPAWN_RATE ?= 4
SCENARIO ?= mix
SLA ?= default
PROCESSES ?= 0

loadtest: install models ## Locust against the stack (URL=, DURATION=, USERS=, SCENARIO=, SLA=); SLA verdict last
	$(UV) run narthex-loadtest $(if $(URL),--url $(URL)) --port-base $(PORT_BASE) \
		--duration $(DURATION) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--scenario $(SCENARIO) --sla $(SLA) --processes $(PROCESSES)

bench-peers: install models ## narthex beside Envoy, HAProxy, PyTriton, infinity (peers go in .tools/peers)
	@command -v wrk >/dev/null || { echo "installing wrk (Debian package)"; \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(UV) run python -m bench.peers

models: install ## Build the built-in models (fraud, minilm) into .state/models if missing
	$(UV) run narthex models build

install: .venv/.installed ## Create .venv from uv.lock (done by run/test/bench)

.venv/.installed: uv.lock $(MEMBERS) | $(UV)
	$(UV) sync --frozen
	@touch $@

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

clean: ## Remove the virtualenv, tool copies, caches and local state
	rm -rf .venv .tools .state .mypy_cache .ruff_cache .pytest_cache
