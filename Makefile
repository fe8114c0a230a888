# `make run` and `make test` do all the set-up on a fresh machine (README.md).
PYTHON ?= python3

.PHONY: install run test services browser bench

install:
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'

run: install
	$(PYTHON) -m service.cli serve  # the `rlora serve` command, whatever PATH says

services:
	./scripts/start-services

browser:
	./scripts/install-browser  # chromium + chromedriver for the dashboard's browser test; a no-op when present

test: install services browser
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_layer.py
