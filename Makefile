# Quick start: `make demo` trains and evaluates a small UniCL on the built-in dataset; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean-venv
DEMO_OUT := output/demo
DEMO_RUN := $(DEMO_OUT)/unicl_tiny/builtin_unicl

# The venv is rebuilt when requirements.txt changes; a half-built one is never mistaken for a good one.
$(VENV)/.installed: requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, torchvision, timm, transformers, yacs, webdataset, pytest"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Generates the built-in dataset, trains the tiny UniCL on labels + captions (about 2.5 minutes on 2 CPU
# cores), then evaluates it zero-shot on the held-out "colour shape" classes.
demo: $(VENV)/.installed
	$(PY) -m data.builtin --out demo_data --scale small
	rm -rf $(DEMO_OUT)
	$(PY) main.py --cfg configs/unicl_tiny_builtin.yaml --data-path demo_data --output $(DEMO_OUT)
	$(PY) evaluate.py zeroshot --cfg configs/unicl_tiny_builtin.yaml --data-path demo_data/zeroshot \
		--resume "$$(ls $(DEMO_RUN)/checkpoint_*.pth | tail -n 1)" --output $(DEMO_OUT)/zeroshot --save-predictions
	@echo "results: $(DEMO_OUT)/zeroshot/zeroshot_results.json"

clean-venv:
	rm -rf $(VENV)
