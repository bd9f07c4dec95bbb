# `make test` and `make demo` set up everything they need in .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fast suite (includes a short real end-to-end training run); slow end-to-end runs: `make test-slow`.
# The Ding dictionary is installed when this user can (root or passwordless sudo), so that the test
# of the real-dictionary loader runs; without it that one test is skipped and says why.
test: $(STAMP)
	bash scripts/ensure_ding.sh || echo "warning: trans-de-en not installed; its loader test will be skipped"
	$(VENV)/bin/ruff check nm_hf recipes benchmarks tests
	$(PY) -m pytest -q -rs

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check nm_hf recipes benchmarks tests

# The translation recipe on the embedded Ding dictionary data (installs it if missing).
demo: $(STAMP)
	bash scripts/ensure_ding.sh
	$(VENV)/bin/accelerate launch --num_processes 1 --num_cpu_threads_per_process 2 recipes/translation.py recipes/configs/translation_demo.yaml

bench: $(STAMP)
	$(PY) benchmarks/mask_speed.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
