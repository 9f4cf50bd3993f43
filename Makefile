# rae: `make all` runs the demonstration pipeline, `make test` the test suite. Both set up .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RAE := $(VENV)/bin/rae
OUT ?= out/demo
PRESET ?= demo
# Torch comes pinned to the release on this project's machines' local disk; pyproject.toml keeps
# a loose range for users elsewhere.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: all install test clean demo-data encode

all: install encode
	@echo "demonstration pipeline done: artifacts in $(OUT) (random-weight demo encoder, not a real representation)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo-data: install
	$(RAE) demo-data $(OUT)/images

encode: demo-data
	$(RAE) encode $(OUT)/images --out $(OUT)/latents.zarr --preset demo --flip

test: install
	$(PY) -m pytest tests

clean:
	rm -rf out .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
