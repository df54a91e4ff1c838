# Two entry points, each installs what it needs first:
#   make run    the main job on the embedded default
#   make test   the test suite
#   make test-fast  the suite less the tests marked slow (real workers, browsers, compilers)
#   make lint   ruff's checks (pyproject.toml [tool.ruff])
# Both install the exact set in constraints.txt; pyproject.toml only states ranges.
# See docs/install.md for test-older-torch and constraints.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONSTRAINTS := constraints.txt
PIP_FLAGS   := --quiet --disable-pip-version-check

# A second, older torch for the tests that exercise torch itself. 2.13.0+cpu is
# the CPU-only wheel on this machine's disk (a few hundred MB, no CUDA wheels).
OLDER_TORCH ?= 2.13.0+cpu
OLDER_VENV  := build/venv-torch-$(OLDER_TORCH)
OLDER_STAMP := $(OLDER_VENV)/.installed-stamp
OLDER_TESTS ?= tests/test_rules_foreach.py tests/test_rules_text.py tests/test_rules_tokens.py \
               tests/test_optim.py tests/test_protocol.py tests/test_stacking.py tests/test_install.py \
               tests/test_tensor_state.py tests/test_optim_dropin.py

.PHONY: install run test test-fast lint test-older-torch constraints bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/nos enqueue

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# nos's dependencies and test tools, less torch and torchvision, at constraints.txt's
# versions (less torch's own CUDA pins, which belong to the pinned torch): installed
# beside the older torch, then nos itself with --no-deps, as on a GPU machine.
define NOT_TORCH
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.match(r"[A-Za-z0-9_.-]+", req).group() not in ("torch", "torchvision"):
        print(req)
endef
export NOT_TORCH

$(OLDER_STAMP): pyproject.toml $(CONSTRAINTS)
	rm -rf $(OLDER_VENV)
	$(PYTHON) -m venv $(OLDER_VENV)
	$(PYTHON) -c "$$NOT_TORCH" > $(OLDER_VENV)/requirements.txt
	grep -Ev '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' $(CONSTRAINTS) > $(OLDER_VENV)/constraints.txt
	$(OLDER_VENV)/bin/pip install $(PIP_FLAGS) -c $(OLDER_VENV)/constraints.txt \
	    'torch==$(OLDER_TORCH)' -r $(OLDER_VENV)/requirements.txt
	$(OLDER_VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $(OLDER_STAMP)

test-older-torch: $(OLDER_STAMP)
	$(OLDER_VENV)/bin/python -c 'import torch; print("torch", torch.__version__)'
	$(OLDER_VENV)/bin/python -m pytest -q $(OLDER_TESTS)

# Rewrites constraints.txt from a fresh resolution of pyproject.toml's ranges.
constraints:
	rm -rf build/venv-constraints
	$(PYTHON) -m venv build/venv-constraints
	build/venv-constraints/bin/pip install $(PIP_FLAGS) -e '.[test]'
	{ sed -n '/^#/p' $(CONSTRAINTS); build/venv-constraints/bin/pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf build/venv-constraints

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
