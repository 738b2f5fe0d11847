# hesscli — `make help` lists the targets.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
SAMPLES    := sample_checkpoints

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench bench-quick samples clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## Create .venv with the CPU build of torch and hesscli (editable) + dev tools

demo: install ## Run hesscli on the bundled digits MLP checkpoint
	@mkdir -p demo-out
	$(BIN)/hesscli compute $(SAMPLES)/digits_mlp.pt --data $(SAMPLES)/digits.pt -o demo-out/hessian.npz --force
	$(BIN)/hesscli spectrum demo-out/hessian.npz --top-k 5 -o demo-out/spectrum.npz --force

test: install ## Run the whole test suite, slow tests included
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install ## The quick suite: every test not marked slow
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: install ## ruff check
	$(BIN)/ruff check hesscli tests bench $(SAMPLES)

format: install ## ruff format
	$(BIN)/ruff format hesscli tests bench $(SAMPLES)

bench: install ## Full benchmark against the naive methods and the peers; writes bench/RESULTS.md
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH_SPEC)"
	@# curvlinops pulls BackPACK, which pulls a torchvision that the pinned torch cannot load (and that
	@# breaks transformers' imports); nothing benchmarked needs it
	$(BIN)/python -m pip uninstall -y -q torchvision || true
	$(BIN)/python bench/run.py

bench-quick: install ## A quick benchmark run (smaller cases, fewer repeats)
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH_SPEC)"
	$(BIN)/python -m pip uninstall -y -q torchvision || true
	$(BIN)/python bench/run.py --quick

samples: install ## Regenerate sample_checkpoints/ (needs scikit-learn, in the dev extra)
	$(BIN)/python $(SAMPLES)/make_samples.py

clean: ## Remove the virtualenv and outputs
	rm -rf $(VENV) demo-out .pytest_cache
