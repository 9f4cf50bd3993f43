# rae: `make all` runs the demonstration pipeline, `make test` the test suite. Both set up .venv.
# `make all PRESET=imagenet256 DATA=/path/to/imagenet/train [NPROC=8]` runs the real ImageNet 256 chain
# (README, "The real run: ImageNet 256"); without DATA it prints that chain and stops.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RAE := $(VENV)/bin/rae
OUT ?= out/demo
# Torch comes pinned to the release on this project's machines' local disk; pyproject.toml keeps
# a loose range for users elsewhere.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# The demo is small: one thread per process is fastest on a 2-core machine.
DEMO_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1

PRESET ?= demo
.PHONY: all install test test-portability fuzz clean demo imagenet256 imagenet256-chain experiments

ifeq ($(PRESET),demo)
all: install demo
else ifeq ($(PRESET),imagenet256)
all: imagenet256
else
all:
	@echo "error: make all takes PRESET=demo (the default) or PRESET=imagenet256, not '$(PRESET)'" >&2; exit 2
endif

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The whole chain on generated data, each stage from the previous stage's artifacts on disk.
# Every stage resumes or reuses what is finished, so running it twice redoes nothing.
demo: install
	$(DEMO_ENV) $(RAE) demo-data $(OUT)/images
	$(DEMO_ENV) $(RAE) encode $(OUT)/images --out $(OUT)/latents.zarr --preset demo --flip
	$(DEMO_ENV) $(RAE) encode $(OUT)/images --out $(OUT)/originals.zarr --preset demo
	$(DEMO_ENV) $(RAE) train-decoder --latents $(OUT)/latents.zarr --out $(OUT)/decoder --preset demo
	$(DEMO_ENV) $(RAE) train-diffusion --latents $(OUT)/latents.zarr --out $(OUT)/diffusion --preset demo
	$(DEMO_ENV) $(RAE) sample --model $(OUT)/diffusion --out $(OUT)/samples.zarr --preset demo
	$(DEMO_ENV) $(RAE) sample --model $(OUT)/diffusion --out $(OUT)/noise.zarr --preset demo --steps 0 --per-class 40
	$(DEMO_ENV) $(RAE) decode $(OUT)/samples.zarr --decoder $(OUT)/decoder --out $(OUT)/sample_images
	$(DEMO_ENV) $(RAE) decode $(OUT)/noise.zarr --decoder $(OUT)/decoder --out $(OUT)/noise_images
	$(DEMO_ENV) $(RAE) decode $(OUT)/originals.zarr --decoder $(OUT)/decoder --out $(OUT)/reconstructions
	$(DEMO_ENV) $(RAE) demo-report $(OUT)

# The real run: ImageNet-1k train at 256, DINOv2-B, ViT-XL decoder, DiT^DH-XL, FID-50K (README).
# NPROC > 1 runs every stage under torchrun on this machine's GPUs.
DATA ?=
NPROC ?= 1
REAL_OUT ?= out/imagenet256
FID_REF ?= VIRTUAL_imagenet256_labeled.npz
# Micro-batches of 128 per GPU for the global batch of 1024 (8 on one GPU, 1 on 8).
GRAD_ACCUM ?= $(shell expr 8 / $(NPROC) \| 1)
ifeq ($(NPROC),1)
RAE_RUN := $(RAE)
else
RAE_RUN := $(VENV)/bin/torchrun --nproc_per_node $(NPROC) -m rae_cli.main
endif

imagenet256:
ifeq ($(strip $(DATA)),)
	@echo "The real run (README: 'The real run: ImageNet 256'), NPROC=$(NPROC), results under $(REAL_OUT):"
	@$(MAKE) --no-print-directory -n imagenet256-chain DATA=/path/to/imagenet/train
	@echo "error: to run it, give the ImageNet train folder (one subfolder per class): make all PRESET=imagenet256 DATA=/path/to/imagenet/train [NPROC=8]" >&2
	@exit 2
else
	$(MAKE) --no-print-directory install
	$(MAKE) --no-print-directory imagenet256-chain
endif

imagenet256-chain:
	test -f $(FID_REF) || { echo "error: $(FID_REF) not found: download ADM's ImageNet 256 reference batch (openai/guided-diffusion, evaluations) or set FID_REF=" >&2; exit 2; }
	$(RAE_RUN) encode $(DATA) --out $(REAL_OUT)/in1k_dinov2b.zarr --preset imagenet256 --encoder dinov2-b --flip
	$(RAE_RUN) train-decoder --latents $(REAL_OUT)/in1k_dinov2b.zarr --out $(REAL_OUT)/decoder_xl --preset imagenet256 --compile
	$(RAE_RUN) train-diffusion --latents $(REAL_OUT)/in1k_dinov2b.zarr --out $(REAL_OUT)/ditdh_xl --preset imagenet256 --model ditdh-xl --compile --grad-accum $(GRAD_ACCUM)
	$(RAE_RUN) sample --model $(REAL_OUT)/ditdh_xl --out $(REAL_OUT)/fid50k.zarr --preset imagenet256 --per-class 50 --compile
	$(RAE_RUN) decode $(REAL_OUT)/fid50k.zarr --decoder $(REAL_OUT)/decoder_xl --out $(REAL_OUT)/fid50k --preset imagenet256
	$(RAE_RUN) eval $(REAL_OUT)/fid50k/samples.npz --ref $(FID_REF)

# The paper's findings (EXPERIMENTS.md) on one GPU, in turn, each resumable:
# make experiments STORE=in1k_dinov2b.zarr IMAGES=/path/to/its/images [EXP_OUT=runs/experiments]
# The sizes below take about half an hour of one H200 (the scripts' own defaults are larger). Measured
# there on 2026-12-02 (EXPERIMENTS.md): width ~100-120 s a model, compiled; shift ~3 min a run and head
# ~3 min a model, uncompiled, with ~20 s a score; noise-aug ~3.5 min a decoder. Each *_ARGS variable
# replaces them, e.g. SHIFT_ARGS="--steps 20000 --every 2000 --batch 256". An interrupted `make
# experiments` resumes where it stopped (results kept after each score, width's after each model,
# noise-aug's after each decoder).
STORE ?=
IMAGES ?=
EXP_OUT ?= runs/experiments
WIDTH_ARGS ?= --compile
SHIFT_ARGS ?= --model ditdh-s --steps 480 --every 120 --batch 128 --num 1000
HEAD_ARGS ?= --models dit-b,ditdh-s --budget 10 --batch 128 --points 4 --num 1000
NA_ARGS ?= --num 1000 -- --model vit-b --steps 400 --batch-size 64
TRAIN_ARGS ?= --ema-decay 0.995 --no-tensorboard
experiments: install
	@test -n "$(STORE)" -a -n "$(IMAGES)" || { echo "error: make experiments STORE=<latent store, e.g. [768, 16, 16]> IMAGES=<the image folder it was encoded from> [EXP_OUT=$(EXP_OUT)]" >&2; exit 2; }
	$(PY) experiments/width.py --latents $(STORE) --out $(EXP_OUT)/width $(WIDTH_ARGS)
	$(PY) experiments/shift.py --latents $(STORE) --out $(EXP_OUT)/shift $(SHIFT_ARGS) -- $(TRAIN_ARGS)
	$(PY) experiments/head.py --latents $(STORE) --out $(EXP_OUT)/head $(HEAD_ARGS) -- $(TRAIN_ARGS)
	$(PY) experiments/noise_aug.py --latents $(STORE) --images $(IMAGES) --out $(EXP_OUT)/noise_aug --diffusion $(EXP_OUT)/shift/with_shift $(NA_ARGS) --no-tensorboard

test: install
	$(PY) -m pytest tests

# The suite under OMP_NUM_THREADS 1 and 2 and every ATEN_CPU_CAPABILITY this CPU runs (4-6 full runs).
test-portability: install
	tests/tools/portability_sweep.sh $(PY)

# Every stage of the demo chain killed at every write and run again; every shard damaged (minutes).
fuzz: install
	$(PY) tests/tools/fuzz_kills.py

clean:
	rm -rf out .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
