# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-all lint format bench gpu-check bench-sweeps bench-accuracy bench-papers bench-methods bench-cifar100 clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev tools

train: $(STAMP)  ## the default experiment: digits, two teachers (fitted once, then cached), an MLP student
	$(PY) -m kd_lightning.train $(ARGS)

test: $(STAMP)  ## the suite but the tests marked slow (every feature still runs end to end at least once); what CI runs
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)  ## the whole suite, the slowest multi-process tests (marked slow) included
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff (check and format) and the type checker (mypy over kd_lightning/, configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-accuracy: $(STAMP)  ## gallo2020 with controls, landro2021 every teacher subset × combine mode; 3 teacher fits × 3 seeds, 95% CIs
	$(PY) bench/accuracy.py $(ARGS)

bench: $(STAMP)  ## throughput (student, KD live / stored, hand loop, torchdistill), store scale (sweep, DDP, memory), integrity costs (fingerprint of 100k files, checksums of a 1 GB store), startup, recorded views vs live teachers (ImageNet recipe), packed students (landro2021's 7-job sweep, packed vs one by one); median [min-max] of interleaved reps
	$(PY) -c "import torchdistill" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/throughput.py $(ARGS)
	$(PY) bench/scale.py
	$(PY) bench/integrity.py
	$(PY) bench/startup.py
	$(PY) bench/views.py
	$(PY) bench/packed.py

gpu-check: $(STAMP)  ## on one GPU (under 8 min): 16-mixed/bf16-mixed, live vs stored, compile + channels-last, CUDA graphs, recorded views, DDP over NCCL, each with perf.check_syncs; a hand-written loop beside the cifar cases (framework/hand); images/s, ratios, peak memory; writes docs/GPU_CHECK.md (ARGS=--cpu: the smoke mode)
	$(PY) bench/gpu_check.py $(if $(findstring --cpu,$(ARGS)),,--report docs/GPU_CHECK.md) $(ARGS)

bench-sweeps: $(STAMP)  ## on a GPU: K = 1, 4, 8 jobs of the CIFAR pair at once (hydra/launcher=gpu_pool) and K packed (hydra/launcher=packed), student alone and live KD; images/s of the sweep over one job's (ARGS=--cpu: a tiny smoke run)
	$(PY) bench/sweep_pool.py $(ARGS)

bench-papers: $(STAMP)  ## rahbar2020, thapa2022, ye2019, landro2021 reproductions with controls; teacher fits × seeds, tables + PNG plots
	$(PY) bench/papers.py $(ARGS)

bench-methods: $(STAMP)  ## every method on MNIST-1D, tuned alike on validation (Optuna), 5 seeds with 95 % intervals; ARGS="--untuned"
	$(PY) bench/methods.py $(ARGS)

bench-cifar100: $(STAMP)  ## the CRD table's 13 CIFAR-100 pairs beside the published numbers: ARGS="--data-root DIR [--teachers DIR] [--pairs ...] [--methods ...] [--seeds ...]"
	$(PY) bench/cifar100.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
