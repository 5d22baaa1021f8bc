# Two commands on a fresh machine: `make demo` (the CPU demo: python -m scale.pretrain) and `make test`.
# Both create .venv from the pinned requirements first, if it is not there yet.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-all lint gpu-check gpu-wheels

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

# The prepared GPU check (docs/benchmarks.md): on a GPU machine, with its own python3 (or .venv's here,
# where every CUDA-only step reports itself skipped). `make gpu-wheels` (here) first puts the packages
# a bare GPU image lacks into wheels/ (about 5 MB; the check installs them into a new folder of its own,
# mode 0700, nothing else: no fixed /tmp name another user of the node could plant).
GPU_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)

gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check

GPU_WHEEL_PINS := pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
	hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7

gpu-wheels: install
	rm -rf wheels && mkdir -p wheels
	$(BIN)/pip wheel -q --no-deps -w wheels deepspeed==0.19.8
	$(BIN)/pip download -q --no-deps -d wheels $(GPU_WHEEL_PINS)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels pydantic-core==2.50.5
	du -sh wheels
