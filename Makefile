# ernie45 — set-up and common tasks. `make test` and `make demo` install first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned and installed first so no dependency can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,test,langchain-test]" torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

# The main suite runs without third-party plugin autoloading (langchain-tests installs plugins that block
# sockets and change asyncio); the LangChain standard tests then run on their own, with those plugins.
PYTEST := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python -m pytest -p pytest_timeout

test: $(STAMP)
	$(PYTEST) -q tests --ignore=tests/langchain_standard
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/langchain_standard --disable-socket --allow-unix-socket

test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow" tests --ignore=tests/langchain_standard

DEMO_PROMPT ?= 写一首题为《静夜思》的诗

demo: $(STAMP)
	@echo ">>> $(DEMO_PROMPT)"
	@echo "$(DEMO_PROMPT)" | $(BIN)/ernie45 chat --max-new-tokens 96 --seed 0

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: $(STAMP)
	$(BIN)/ernie45 bench --out bench/results.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
