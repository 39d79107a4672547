# Quick start: `make demo` trains and evaluates a small UniCL on the built-in dataset; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean-venv

# The venv is rebuilt when requirements.txt changes; a half-built one is never mistaken for a good one.
$(VENV)/.installed: requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, torchvision, timm, transformers, yacs, webdataset, pytest"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
