# Two set-up commands: `make run` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# Pass extra pip arguments (e.g. a CPU wheel index) with TORCH_PIP_ARGS=...
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS    ?=

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM   := false
# DeepSpeed installs as pure Python and JIT-compiles its CPU ops on first use (~70 s);
# the build is cached here so only the first test run after a clone pays for it.
export DS_BUILD_OPS             := 0
export TORCH_EXTENSIONS_DIR     ?= $(CURDIR)/.cache/torch_extensions

.PHONY: run test venv lint clean assets slurm-services slurm-services-down

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sft-cluster run jobs/smoke.yaml

test: $(STAMP) slurm-services
	$(BIN)/ruff check .
	$(BIN)/lint-imports --cache-dir .cache/import_linter
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/lint-imports --cache-dir .cache/import_linter

# A real single-node (+ fake two-node) Slurm for tests/integration/test_slurm.py: installs
# slurm-wlm + munge with apt when missing (root), starts munged/slurmctld/slurmd; idempotent.
slurm-services:
	bash scripts/slurm_services.sh up

slurm-services-down:
	bash scripts/slurm_services.sh down

assets: $(STAMP)
	$(BIN)/python scripts/make_assets.py

clean:
	rm -rf $(VENV) runs .pytest_cache
