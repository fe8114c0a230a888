# `make run` and `make test` do all the set-up on a fresh machine (README.md): a project virtual
# environment in .venv, made by the machine's python3 and installed into once (again only when
# pyproject.toml changes), so a system Python that refuses pip ("externally-managed-environment")
# is never touched.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
VENV_PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install run test services browser tools bench

install: $(INSTALLED)

# A failed venv (Debian without python3-venv) is removed, or the next make would take it as made.
$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PYTHON) -m venv failed: install its venv module (Debian: python3-venv)"; exit 1; }

# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
$(INSTALLED): pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q torch==2.13.0
	$(VENV_PYTHON) -m pip install -q -e '.[dev]'
	# TGI's and LoRAX's clients, for the tests: their huggingface-hub<1.0 pin conflicts with transformers 5.
	$(VENV_PYTHON) -m pip install -q --no-deps 'text-generation>=0.7' 'lorax-client>=0.6'
	touch $@

run: install
	$(VENV_PYTHON) -m service.cli serve --host $(HOST) --port $(PORT)  # `rlora serve`, whatever PATH says

services:
	./scripts/start-services

browser:
	./scripts/install-browser  # chromium + chromedriver for the dashboard's browser test; a no-op when present

tools:
	./scripts/install-tools  # wrk for the API benchmark's test; a no-op when present

test: install services browser tools
	$(VENV_PYTHON) -m pytest -q

bench: install
	$(VENV_PYTHON) benchmarks/bench_layer.py
