# Quickstart targets. Each sets up what it needs in ./.venv (torch 2.13.0 CPU from the local wheel
# cache, then mage_fast editable, built against that torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mage_fast-installed

.PHONY: setup bench test info clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0" "ninja>=1.11" "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/decode_throughput.py

test: $(STAMP)
	$(PY) -m pytest -q tests

info: $(STAMP)
	$(PY) -m mage_fast info

clean:
	rm -rf $(VENV) build *.egg-info mage_fast/*.so
