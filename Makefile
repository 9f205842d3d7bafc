# One entry point per job; every target creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu
# pip extras: on a machine with an NVIDIA GPU, `make setup EXTRAS=gpu,test` (a fresh .venv).
EXTRAS ?= cpu,test

.PHONY: setup test test-fast lint table1 figures results bench

$(BIN)/paper-kd: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/paper-kd

test: setup
	$(BIN)/python -m pytest -ra

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

table1: setup
	$(BIN)/python reproduce/table1.py --profile $(PROFILE)

figures: setup
	$(BIN)/python reproduce/figure_roc.py --profile $(PROFILE)
	$(BIN)/python reproduce/figure_boost.py --profile $(PROFILE)

# Table 1 and both figures, then the README's Results section (figures reuse Table 1's models).
# PUBLISHED=path/lorentznet_top.npz also measures the published teacher on the generated jets.
results: setup
	$(BIN)/python reproduce/table1.py --profile $(PROFILE)
	$(BIN)/python reproduce/figure_roc.py --profile $(PROFILE)
	$(BIN)/python reproduce/figure_boost.py --profile $(PROFILE)
	$(BIN)/python reproduce/table1.py --profile $(PROFILE) --update-readme \
		$(if $(PUBLISHED),--published-teacher $(PUBLISHED))

bench: setup
	$(BIN)/paper-kd bench
