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

.PHONY: quickstart test test-unit test-integration lint bench setup clean bytecode

setup: $(VENV)/.installed

# Our sources as bytecode, once: every process (Ray workers, spawned ranks) otherwise compiles them again
# where PYTHONDONTWRITEBYTECODE is set (compiling all of them takes 0.24 s here, so at most that a process);
# installed packages were compiled at set-up.
bytecode: setup
	@$(BIN)/python -m compileall -q dmea_dist ray_jobs tests benchmarks > /dev/null

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu"\
	  "install the python3-venv package (apt-get install python3-venv), or give another Python: make PYTHON=python3.11" >&2; exit 1; }
	@# The CPU wheel: a local build where pip's find-links has one, else PyTorch's CPU index. "+cpu": PyPI's
	@# torch of that version is the CUDA build on Linux, which a plain "torch==$(TORCH_VERSION)" would pull.
	$(BIN)/python -m pip install -q --no-compile "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/python -m pip install -q --no-compile "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	@# Bytecode for every installed package, on all cores (pip compiles on one: 135 s for the two installs
	@# above against 74 s + 39 s here). Not optional where PYTHONDONTWRITEBYTECODE is set: a process would
	@# compile what it imports, every time. Like pip, a file that is not Python 3.11 (torch ships one) is skipped.
	@$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  > /dev/null || true
	touch $@

quickstart: setup bytecode
	$(BIN)/dmea run configs/quickstart.yaml

# the 15 slowest tests last: CI runs this on 2 cores and must stay under 20 minutes
test: setup bytecode
	$(BIN)/python -m pytest -q -ra --durations=15

test-unit: setup bytecode
	$(BIN)/python -m pytest -q -m "not integration" tests/unit

test-integration: setup bytecode
	$(BIN)/python -m pytest -q -m integration

lint: setup
	$(BIN)/ruff check dmea_dist tests ray_jobs benchmarks

clean:
	rm -rf $(VENV) runs mlflow.db mlruns .pytest_cache
