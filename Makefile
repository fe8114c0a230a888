# `make run` and `make test` do all the set-up on a fresh machine (README.md).
PYTHON ?= python3

.PHONY: install run test services bench

install:
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	# TGI's and LoRAX's clients, for the tests: their huggingface-hub<1.0 pin conflicts with transformers 5.
	$(PYTHON) -m pip install -q --no-deps 'text-generation>=0.7' 'lorax-client>=0.6'

run: install
	$(PYTHON) -m service.cli serve  # the `rlora serve` command, whatever PATH says

services:
	./scripts/start-services

test: install services
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_layer.py
