# tokengate: `make test` and `make demo` work on a fresh clone; they install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: help install system-deps idp-deps lint format test unit fuzz demo bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed ## create .venv with tokengate and its test extras

system-deps: ## apt-get redis-server, chromium, nginx, wrk, prometheus when missing
	bash scripts/ensure-system-deps.sh

tests/idp/node_modules/.installed: tests/idp/package-lock.json
	npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
	touch $@

idp-deps: tests/idp/node_modules/.installed ## install the test OpenID Provider (oidc-provider)

lint: install ## ruff and mypy --strict
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/ruff format --check gateway
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format gateway tests bench
	$(VENV)/bin/ruff check --fix gateway tests bench

test: install system-deps idp-deps lint ## lint, then every test (unit, integration, browser)
	$(VENV)/bin/pytest

unit: install ## the fast unit tests only
	$(VENV)/bin/pytest tests/unit

fuzz: install system-deps ## the generated-input tests with 25x the examples (ingress fuzz: ~60,000 requests)
	TOKENGATE_HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest --timeout 3600 \
		tests/integration/test_ingress_fuzz.py $$(grep -rl '@given' tests --include='test_*.py' | grep -v test_ingress_fuzz)

demo: install system-deps idp-deps ## run the whole stack locally (IdP, Redis, API, SPA, tokengate)
	$(PY) demo/run.py

bench: install system-deps ## benchmark against nginx and the bare aiohttp floor
	$(PY) bench/run.py --results bench/RESULTS.md
