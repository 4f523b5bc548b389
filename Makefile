# Run `make help` for the list of targets.
# TORCH picks the torch build: the default pin gets the CPU wheel where one is cached and the
# CUDA wheel from PyPI elsewhere; e.g. `make train TORCH="torch==2.8.0"` for your own build.
# CONSTRAINTS pins every other package to the versions the README's figures were measured with;
# `make install CONSTRAINTS=` takes the newest releases instead, `make lock` re-pins them.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
VENV   ?= .venv
CONFIG ?= configs/sft.yaml
ARGS   ?=
# test processes, a test file each (pytest-xdist); TEST_JOBS=0 runs the suite in this process
TEST_JOBS ?= 2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install lock train preview check-template test test-fast lint format tensorboard data assets bench-data bench-train bench-dpo bench-memory clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create the virtual environment and install the project (first time only)

lock: ## Pin the installed versions (all but torch) in constraints.txt
	@test -x $(BIN)/python || { echo "no $(VENV): run make install (CONSTRAINTS= for the newest) first"; exit 1; }
	{ echo "# Versions the README's figures were measured with (Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# \`make install\` installs these; \`make install CONSTRAINTS=\` the newest; \`make lock\` re-pins."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^torch=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

train: $(STAMP) ## Train on the embedded default (CONFIG=configs/sft.yaml, ARGS="--trainer.max_steps 50")
	$(BIN)/python train.py fit --config $(CONFIG) $(ARGS)

preview: $(STAMP) ## Data statistics and examples with the trained tokens marked (CONFIG=..., ARGS=...)
	$(BIN)/python -m src.preview --config $(CONFIG) $(ARGS)

check-template: $(STAMP) ## Probe the chat template of CONFIG's tokenizer; fails on a wrong mask
	$(BIN)/python -m src.preview --check-template --config $(CONFIG) $(ARGS)

test: $(STAMP) ## Run the test suite but the heavy runs (TEST_JOBS=2 processes, a test file each)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations 15 -m "not heavy" $(ARGS)

test-all: $(STAMP) ## Run every test, the heavy runs too (DeepSpeed, FSDP1, benchmark smokes)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

test-fast: $(STAMP) ## Run the tests that take seconds (no end-to-end runs)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

tensorboard: $(STAMP) ## Open TensorBoard on runs/ (http://localhost:6006)
	$(BIN)/tensorboard --logdir runs --port 6006

data: $(STAMP) ## Rebuild the demo datasets in data/demo (deterministic)
	$(BIN)/python scripts/build_demo_data.py

assets: $(STAMP) ## Rebuild the tiny tokenizer and model config in assets/ (deterministic)
	$(BIN)/python scripts/build_assets.py

bench-data: $(STAMP) ## Data preparation benchmark against TRL (bench/data.py)
	$(BIN)/python bench/data.py $(ARGS)

bench-train: $(STAMP) ## SFT tokens/s against TRL's SFTTrainer and a bare loop (bench/train.py)
	$(BIN)/python bench/train.py $(ARGS)

bench-dpo: $(STAMP) ## LoRA DPO pairs/s against TRL's DPOTrainer, DPO/SFT memory (bench/dpo.py)
	$(BIN)/python bench/dpo.py $(ARGS)

bench-memory: $(STAMP) ## LM head memory and time, full logits vs lean; packed DPO (bench/memory.py)
	$(BIN)/python bench/memory.py $(ARGS)

clean: ## Remove runs, caches (prepared data included) and the virtual environment
	rm -rf runs .cache .pytest_cache .ruff_cache $(VENV)
