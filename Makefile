# tttla: every common task is one make target. Run `make install` once, then `make test`.
PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip
CONFIG ?= configs/train/tiny_cpu.yaml
NPROC ?= 2
ARGS ?=
DATA ?= data/stdlib
SEQ_LEN ?= 512
RUNS ?= runs
DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)

.PHONY: install test test-gpu test-gpu-slow train prepare-data tensorboard bench-kernels bench-token-read bench-ladder bench-train bench-sp mutations clean

install:
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,eval]'

test:
	$(PYTHON) -m pytest -q -x --timeout=900

# The GPU suite (target: under 5 minutes on one H100); its long cases run apart with test-gpu-slow.
# Most of its time is Inductor and Triton compiling on the host, so GPU_WORKERS pytest processes
# (pytest-xdist, the dev extra) share the one GPU; GPU_WORKERS=0 runs it in one process.
GPU_WORKERS ?= 4
test-gpu:
	$(PYTHON) -m pytest -q -m "gpu and not gpu_slow" $(if $(filter-out 0,$(GPU_WORKERS)),-n $(GPU_WORKERS)) tests/gpu

test-gpu-slow:
	$(PYTHON) -m pytest -q -m gpu_slow tests/gpu

# One node, NPROC processes: `make train CONFIG=configs/train/125m_16k.yaml NPROC=1 ARGS="train.steps=100"`.
# The default config reads data/stdlib, which is built here when missing (unless ARGS sets data.path).
# A run directory that holds checkpoints is continued (train.resume=auto), so running it again
# resumes; ARGS may override that. train.job.launch is torchrun that reports a failure in one line (ARGS=--debug: all of it).
train:
	@if [ "$(CONFIG)" = "configs/train/tiny_cpu.yaml" ] && [ -z "$(findstring data.path=,$(ARGS))" ] && [ ! -f data/stdlib/manifest.json ]; then $(MAKE) prepare-data DATA=data/stdlib SEQ_LEN=512; fi
	DS_ACCELERATOR=$(DS_ACCELERATOR) $(PYTHON) -m train.job.launch --standalone --nproc_per_node=$(NPROC) -m train $(CONFIG) train.resume=auto $(ARGS)

# The built-in corpus (standard-library sources, byte tokenizer): `make prepare-data DATA=data/stdlib_16k SEQ_LEN=16384`.
prepare-data:
	$(PYTHON) -m train.data.prepare --stdlib --out $(DATA) --seq-len $(SEQ_LEN)

tensorboard:
	$(PYTHON) -m tensorboard.main --logdir $(RUNS) --bind_all

bench-kernels:
	$(PYTHON) -m benchmarks.kernel_ops

# A decode step's fast-weight read at each batch: the Triton kernel beside its torch forms, in CUDA graphs.
bench-token-read:
	$(PYTHON) -m benchmarks.token_read --out docs/bench/token_read.json

# The simplification ladder V0..V6 (arXiv 2602.21204, Table 2): one 760M layer per step, recurrent and
# parallel tokens/s beside the paper's; writes docs/bench/ladder.json and ladder.md (CUDA).
bench-ladder:
	$(PYTHON) -m benchmarks.ladder

# The whole model's training step against the same-size transformer (one GPU): tokens/s, peak memory,
# MFU and the ceiling the mixer allows; each preset fits in about 8 minutes and merges its rows into
# docs/bench/train_step.json and .md (`make bench-train PRESETS=760m` runs one).
PRESETS ?= 125m 760m long
bench-train:
	for preset in $(PRESETS); do $(PYTHON) -m benchmarks.step --preset $$preset || exit 1; done

# Break the layer on purpose in copies of the tree and check that the tests catch every breakage.
mutations:
	$(PYTHON) -m tests.mutations

# Sequence-parallel benchmark on NPROC GPUs of one host (NVLink multicast stays off).
bench-sp:
	NCCL_NVLS_ENABLE=0 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) -m benchmarks.sequence_parallel

clean:
	rm -rf runs .pytest_cache
