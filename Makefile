# rae: `make all` runs the demonstration pipeline, `make test` the test suite. Both set up .venv.
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

.PHONY: all install test clean demo

all: install demo

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

test: install
	$(PY) -m pytest tests

clean:
	rm -rf out .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
