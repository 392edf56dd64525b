# Quickstart targets. Each sets up what it needs in ./.venv (torch 2.13.0 CPU from the local wheel
# cache, then mage_fast editable, built against that torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mage_fast-installed

# Fashion-MNIST from Debian (the tests' real data: decode_quality's test-split reference, the shipped
# models' checks); nothing is downloaded at run time. Installed here when missing and we may.
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: setup bench test info clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0" "ninja>=1.11" "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/decode_throughput.py

$(FMNIST):
	@echo "installing Debian's dataset-fashion-mnist (the tests read its test split)"
	apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  { echo "error: $(FMNIST) is missing; install Debian's dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist)" >&2; exit 2; }

test: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q tests

info: $(STAMP)
	$(PY) -m mage_fast info

clean:
	rm -rf $(VENV) build *.egg-info mage_fast/*.so
