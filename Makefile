# Quick start: `make demo` trains and evaluates a small UniCL on the built-in dataset; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-oldest test-slurm demo ablation ablation-losses clean-venv
DEMO_OUT := output/demo
DEMO_RUN := $(DEMO_OUT)/unicl_tiny/builtin_unicl

# The venv is rebuilt when requirements.txt changes; a half-built one is never mistaken for a good one.
$(VENV)/.installed: requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, torchvision, timm, transformers, yacs, webdataset, matplotlib, pytest"
	touch $@

# The optional C helper (data/jpeg_region.py): decodes only the training crop of a JPEG, resizes it and runs
# RandAugment's affine ops, with Pillow's pixels. Without libjpeg-turbo's headers it is built without the
# decode; without a C compiler Pillow does all of it. The training log says which.
JPEG_REGION := data/_jpeg_region.so
$(JPEG_REGION): data/jpeg_region.c data/resample.c data/affine.c data/lookup.c $(VENV)/.installed
	$(PY) -m data.jpeg_region --quiet-failure

test: $(VENV)/.installed $(JPEG_REGION)
	$(PY) -m pytest -q

# cluster/unicl.sbatch on a real one-node SLURM from Debian's packages (needs root; installs munge and SLURM
# with apt-get when missing): stopped by the time limit, scontrol requeue, a preemption and scancel, each
# resumed with no step redone, the final weights equal to an uninterrupted run's. About 7-10 minutes on 2 CPU
# cores; not part of `make test`.
test-slurm: $(VENV)/.installed
	bash tests/cluster/run_slurm_test.sh

# Generates the built-in dataset, trains the tiny UniCL on labels + captions (about 3 minutes on 2 CPU
# cores), evaluates it zero-shot on the held-out "colour shape" classes and with a linear probe on the
# shapes, and writes output/demo/report.md with curves.png.
demo: $(VENV)/.installed $(JPEG_REGION)
	$(PY) -m data.builtin --out demo_data --scale small
	rm -rf $(DEMO_OUT)
	$(PY) main.py --cfg configs/unicl_tiny_builtin.yaml --data-path demo_data --output $(DEMO_OUT)
	$(PY) evaluate.py zeroshot --cfg configs/unicl_tiny_builtin.yaml --data-path demo_data/zeroshot \
		--resume "$$(ls $(DEMO_RUN)/checkpoint_*.pth | tail -n 1)" --output $(DEMO_OUT)/zeroshot --save-predictions
	$(PY) evaluate.py linear-probe --cfg configs/unicl_tiny_builtin.yaml --train-path demo_data/labels/train \
		--val-path demo_data/labels/val --resume "$$(ls $(DEMO_RUN)/checkpoint_*.pth | tail -n 1)" \
		--output $(DEMO_OUT)/linear_probe --no-cache
	$(PY) -m reporting.demo --run $(DEMO_RUN) --zeroshot $(DEMO_OUT)/zeroshot \
		--linear-probe $(DEMO_OUT)/linear_probe --output $(DEMO_OUT)

# The longer runs, sweeps of configs/sweeps/ (python -m training.sweep): UniCL vs labels-only vs captions-only
# on the built-in data, and the UniCL, CLIP and sigmoid losses and UniCL with mixup; two training seeds each.
# Each writes sweep.md, sweep.json and sweep.png to output/ablation (output/ablation_losses). Started again,
# a sweep skips the runs it finished and resumes the one it was in: remove the folder to train them anew.
ablation: $(VENV)/.installed $(JPEG_REGION)
	$(PY) -m data.builtin --out demo_data --scale small
	$(PY) -m training.sweep configs/sweeps/builtin_ablation.yaml

ablation-losses: $(VENV)/.installed $(JPEG_REGION)
	$(PY) -m data.builtin --out demo_data --scale small
	$(PY) -m training.sweep configs/sweeps/builtin_losses.yaml

# The suite on the oldest torch the code supports (2.4.1, torchvision 0.19.1) with the newest releases of the
# other requirements, in a venv of its own. Not part of `make test`: it downloads about 5 GB from PyPI.
OLDEST_VENV := .venv-torch2.4
$(OLDEST_VENV)/.installed: requirements.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	grep -v '^torch' requirements.txt > $(OLDEST_VENV)/requirements.txt
	$(OLDEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.4.1 torchvision==0.19.1 \
		-r $(OLDEST_VENV)/requirements.txt
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV) $(OLDEST_VENV)
