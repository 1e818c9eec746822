# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the tests).
# Each creates .venv and installs what it needs, pinned by constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/pip install -q -c constraints.txt
STAMP   = $(VENV)/.stamp

.PHONY: demo demo-headless test test-fast lint bench install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from its exact pin: a bare `torch` requirement would pull the multi-GB CUDA build.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) --upgrade pip >/dev/null
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[all]"
	$(BIN)/python -m tangentscope.optim._build --build || echo "tangentscope: fused kernel not built (no C++ compiler?); GatedAdamW uses its eager kernels"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tangentscope demo

demo-headless: $(STAMP)
	$(BIN)/tangentscope demo --headless

# lint + types + the tests (what CI runs)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not browser and not slow" -x

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
