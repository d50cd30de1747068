# Two entry points, each doing its own set-up (README):
#   make quickstart   a short lifelong run on the embedded defaults, ending with its results
#   make test         the test suite
# Both create .venv with the CPU build of torch first, so no dependency pulls a CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test test-unit test-integration lint bench setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# The CPU wheel: a local build where pip's find-links has one, else PyTorch's CPU index.
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" \
	  || $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(BIN)/dmea run configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q -ra

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration" tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q -m integration

lint: setup
	$(BIN)/ruff check dmea_dist tests ray_jobs benchmarks

clean:
	rm -rf $(VENV) runs mlflow.db mlruns .pytest_cache
