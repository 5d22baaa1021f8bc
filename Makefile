# Two commands on a fresh machine: `make demo` (the CPU demo: python -m scale.pretrain) and `make test`.
# Both create .venv from the pinned requirements first, if it is not there yet.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint

$(BIN)/.installed: setup.py requirements/cpu-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m scale.pretrain

# DeepSpeed JIT-builds its CPU communication op once per environment: keep it inside .venv.
TEST_ENV := TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions

test: install
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" tests

test-all: install
	$(TEST_ENV) $(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
