# The two quickstart commands (README): `make quickstart` and `make test`.
# Each creates the virtual environment it needs on first use (Python 3.10+, ~6.5 GB with torch).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.icp-installed
# torch/torchvision are pinned to the pair verified together here; the package itself admits
# torch 2.4-2.14 (e.g. 2.11 on the GPU machine image).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export WANDB_SILENT := true

.PHONY: setup quickstart test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/icp run experiments/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs data_shards/*/ .pytest_cache
