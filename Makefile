# tttla: every common task is one make target. Run `make install` once, then `make test`.
PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip
CONFIG ?= configs/train/tiny_cpu.yaml
NPROC ?= 2

.PHONY: install test test-gpu train prepare-data tensorboard bench-kernels bench-sp clean

install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'

test:
	$(PYTHON) -m pytest -q -x --timeout=900

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests/gpu

bench-kernels:
	$(PYTHON) -m kernels.bench

clean:
	rm -rf runs .pytest_cache
