# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# torch is pinned here (the CPU build that lies on disk); the package itself asks for a range.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: train test test-fast lint browser bench mutants clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)

train: $(STAMP)  ## train the default preset (CartPole DQN, about a minute)
	$(BIN)/qfleet train cartpole-dqn

test: $(STAMP) lint browser  ## lint, type-check, then every test including the slow learning lane
	$(BIN)/python -m pytest -q

# The compare report's test opens it in headless Chromium: installed with apt where this
# runs as root (CI), else that one test is skipped and says so.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	  >/dev/null; } || echo "no chromium/chromedriver: the report's browser test is skipped"

test-fast: $(STAMP)  ## the tests without the slow learning lane
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check qfleet tests benchmarks examples
	$(BIN)/mypy qfleet benchmarks examples

bench: $(STAMP)  ## benchmarks need the peer libraries
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH_PIN)"
	$(BIN)/python benchmarks/cartpole_vs_sb3.py

# Mutation testing of the core (losses, policies, replay/, roles/; [tool.mutmut] in
# pyproject.toml): slow (about an hour on 2 cores), so not part of `make test` or CI. A fresh
# run each time: mutmut keeps old verdicts when only the tests changed.
MUTANT_CHILDREN ?= 2
mutants: $(STAMP)  ## mutation score per core module, and every surviving mutant
	$(BIN)/python -m pip install -q -e ".[mutants]" "$(TORCH_PIN)"
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_CHILDREN)
	$(BIN)/python tools/mutation_scores.py
	$(BIN)/python tools/mutation_survivors.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
