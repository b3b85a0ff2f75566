# Everything a fresh machine needs, in one place: `make simulate` and `make test` set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
ARGS ?=

.PHONY: simulate test lint model fuzz-nightly mutation docs clean

$(READY): pyproject.toml constraints.txt requirements-vllm.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolution pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# vLLM for the encoder-cache connector: without its pins (it asks for torch 2.14), then what its EC
	# modules, config, Request and SchedulerOutput import.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt "vllm==0.33.0"
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-vllm.txt
	touch $(READY)

simulate: $(READY)
	$(VENV)/bin/epd-receiver simulate $(ARGS)

lint: $(READY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The Quint model: pinned in spec/package-lock.json; typecheck, run tests, invariant simulation.
spec/node_modules/.bin/quint: spec/package.json spec/package-lock.json
	cd spec && npm ci --no-audit --no-fund --loglevel=error
	touch $@

model: $(READY) spec/node_modules/.bin/quint
	$(VENV)/bin/epd-receiver spec check

# The fuzzer's derandomized `ci` profile, as CI runs it, unless HYPOTHESIS_PROFILE names another: the suite's
# budgets (every bug variant caught, the states judged) are the ci profile's. A bare `pytest` runs `dev`.
test: lint model
	EPD_REQUIRE_QUINT=1 HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -q $(ARGS)

# The random walk takes a new seed each day (WALK_SEED=N repeats a night's walk; it prints its seed):
# a million judged steps on one rank, then runs of one to three ranks.
WALK_SEED := $(or $(WALK_SEED),$(shell date +%Y%m%d))

fuzz-nightly: $(READY)
	HYPOTHESIS_PROFILE=nightly $(PY) -m pytest -q tests/kit/test_stateful.py
	$(VENV)/bin/epd-receiver walk --steps 1000000 --seed $(WALK_SEED)
	$(VENV)/bin/epd-receiver walk --steps 100000 --ranks 0 --seed $(WALK_SEED)

# Mutation testing of fsm/ (hours). mutmut derives a mutant's module name from its path and strips a leading
# src/, so the tree is staged with the package at src/epd_receiver; the tests import it from there.
MUTATION_DIR := build/mutation
STAGED := $(MUTATION_DIR)/src/epd_receiver

mutation: $(READY)
	rm -rf $(MUTATION_DIR) && mkdir -p $(STAGED)
	cp __init__.py $(STAGED)/
	cp -r fsm adapters $(STAGED)/
	tar -c --exclude=node_modules spec | tar -x -C $(STAGED)
	tar -c --exclude=node_modules --exclude=__pycache__ spec tests README.md pyproject.toml .ci | tar -x -C $(MUTATION_DIR)
	cd $(MUTATION_DIR) && HYPOTHESIS_PROFILE=mutation $(abspath $(VENV))/bin/mutmut run --max-children 1 $(ARGS)

docs: $(READY)
	$(VENV)/bin/epd-receiver spec sync

clean:
	rm -rf $(VENV) spec/node_modules .hypothesis .pytest_cache .mypy_cache .ruff_cache mutants build
