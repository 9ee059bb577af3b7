# Every target runs inside .venv, created and kept up to date by `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
ARGS ?=
# Test workers (pytest-xdist); each file runs whole on one worker, one thread per worker.
TEST_WORKERS ?= 2
SWEEP ?= pruning_eps
TABLE ?= pruning_tradeoff

.PHONY: install train test lint format bench sweep report reproduce audit audit-table gpu-wheels gpu-check gpu-dry-run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

train: install
	$(BIN)/python -m dpexp.train $(ARGS)

# Canary audit of the configured method and clipping mode: one JSON line (docs/audit.md).
audit: install
	$(BIN)/python -m dpexp.audit $(ARGS)

# The audit table (docs/results/audit.md): honest runs and two planted bugs, input canaries.
audit-table: install
	$(BIN)/python scripts/audit_table.py $(ARGS)

test: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Clipping-mode benchmark of the three reference models (docs/results/clipping_speed.md).
BENCH_DIR ?= outputs/bench
bench: install
	$(BIN)/python -m dpexp.bench model=cnn_tanh dataset=mnist dataset.batch_size=256 hydra.run.dir=$(BENCH_DIR)/cnn_tanh $(ARGS)
	$(BIN)/python -m dpexp.bench model=resnet_gn dataset=synthetic dataset.batch_size=64 hydra.run.dir=$(BENCH_DIR)/resnet_gn $(ARGS)
	$(BIN)/python -m dpexp.bench model=timm +model.patch_size=4 dataset=synthetic dataset.batch_size=64 hydra.run.dir=$(BENCH_DIR)/vit_tiny $(ARGS)
	$(BIN)/python -m dpexp.bench --table $(BENCH_DIR)/cnn_tanh/bench.csv $(BENCH_DIR)/resnet_gn/bench.csv $(BENCH_DIR)/vit_tiny/bench.csv

# The prepared GPU check (docs/gpu_check.md): wheels of what the GPU machine lacks (needs a
# package index), the check itself (OUT=dir), and its dry run here in an environment that
# has only what the GPU machine has.
GPU_ENV ?= /tmp/gpu-env
OUT ?= outputs/gpu_check
gpu-wheels:
	bash scripts/gpu_wheels.sh

gpu-check:
	OUT=$(OUT) bash scripts/gpu_check.sh

gpu-dry-run: install gpu-wheels
	$(BIN)/python scripts/gpu_offline_env.py $(GPU_ENV) --source $(VENV)
	DEVICE=cpu PYTHON=$(GPU_ENV)/bin/python OUT=$(OUT)_cpu bash scripts/gpu_check.sh

# Resumable sweep (conf/sweep/$(SWEEP).yaml) into multirun/$(SWEEP); re-run to finish a killed one.
sweep: install
	$(BIN)/python -m dpexp.train -m +sweep=$(SWEEP) $(ARGS)

# CSV, parquet, plots and a Markdown summary of multirun/$(SWEEP) in multirun/$(SWEEP)/report.
report: install
	$(BIN)/python -m dpexp.report multirun/$(SWEEP)

# A paper table: its sweeps (resumable), their reports, docs/results/$(TABLE).md.
reproduce: install
	$(BIN)/python -m dpexp.tables $(TABLE) --run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
