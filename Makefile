# make            build rebind.so
# make test       install what the checks need (venv, dev packages, system packages, Node's ws)
#                 and run them all
# make pyz        build the zipapp websockify.pyz
# make bench      benchmark against upstream websockify (bench-quick: under 2 minutes)
# make soak       mixed traffic for DURATION seconds (default 600): throughput, RSS, fds, errors
# make clean

PYTHON ?= python3
VENV   ?= .venv
VPY     = $(VENV)/bin/python
CC     ?= cc
CFLAGS ?= -O2
REBIND_CFLAGS = -Wall -Wextra -Werror -fPIC -shared

.PHONY: all test lint typecheck unit matrix system-deps node-deps pyz bench bench-quick bench-deps soak clean

all: rebind.so

rebind.so: rebind.c
	$(CC) $(CFLAGS) $(REBIND_CFLAGS) -o $@ $< -ldl

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $@

# Servers the end-to-end tests talk to; installed when missing and we may (root with apt-get).
system-deps:
	@sh .ci/system-deps

# Node's ws package for the client interoperability tests, pinned by tests/package-lock.json,
# into tests/node_modules; without npm (or its registry) those tests skip and say why.
NODE_DEPS = tests/node_modules/.installed

node-deps: system-deps
	@$(MAKE) -s --no-print-directory $(NODE_DEPS)

$(NODE_DEPS): tests/package.json tests/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
	    echo "no npm: the Node client tests will skip" >&2; \
	elif npm ci --prefix tests --no-audit --no-fund --loglevel=error; then \
	    touch $@; \
	else \
	    echo "npm ci failed: the Node client tests will skip" >&2; \
	fi

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy --strict

unit: $(VENV)/.installed
	$(VPY) -m pytest -q

# The smoke tests again, with the proxy under every Python from 3.6 up that pyenv has.
matrix: $(VENV)/.installed
	.ci/matrix $(VPY)

test: $(VENV)/.installed system-deps node-deps rebind.so pyz lint typecheck
	$(VPY) -m pytest
	.ci/matrix $(VPY)

pyz: websockify.pyz

websockify.pyz: websockify_min.py zipapp/__main__.py
	rm -rf build/pyz && mkdir -p build/pyz
	cp websockify_min.py zipapp/__main__.py build/pyz/
	$(PYTHON) -m zipapp build/pyz -o $@ -p '/usr/bin/env python3'

# The benchmark's own venv: upstream websockify with numpy, to compare against.
BENCH_VENV ?= bench/.venv

$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $@

# socat is the plain TCP relay the throughput cases compare with.
bench-deps: $(BENCH_VENV)/.installed
	@command -v socat >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing socat"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null; }; \
	  else echo "socat missing (not root or no apt-get): its column stays empty" >&2; fi; }

bench: bench-deps
	$(BENCH_VENV)/bin/python bench/run.py

bench-quick: bench-deps
	$(BENCH_VENV)/bin/python bench/run.py --quick

DURATION ?= 600
soak:
	$(PYTHON) bench/soak.py --duration $(DURATION)

clean:
	rm -rf rebind.so websockify.pyz build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache tests/node_modules
