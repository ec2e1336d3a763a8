# zbackupd: two commands do all the set-up.
#   make demo   builds and boots the real-ZFS VM and walks through the user story
#   make check  everything the project tests: lint, types, unit, integration, VM suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv host-deps lint unit fast check vm-test vm-image demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# System packages the integration and VM suites drive for real (sshd, qemu, debootstrap).
host-deps:
	scripts/install-host-deps.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Fast loop: lint, types and every test that needs no VM. Byte-compiling first keeps
# imports in worker threads from compiling source (CPython 3.11's AST constructor is
# not thread-safe: "AST constructor recursion depth mismatch").
fast: lint
	$(BIN)/python -m compileall -q zbackupd tests
	$(BIN)/python -m pytest -m "not vm"

unit: fast

vm-image: venv host-deps
	$(BIN)/python -m tests.vm.build_image

vm-test: venv host-deps
	$(BIN)/python -m compileall -q zbackupd tests
	$(BIN)/python -m pytest -m vm --durations=0 tests/vm

check: host-deps fast vm-test

# Benchmarks (not part of check): each prints zbackupd against a baseline measured in the
# same run, and the ratio; none asserts on time.
bench: venv host-deps
	$(BIN)/python -m benchmarks.bench_plan
	$(BIN)/python -m benchmarks.bench_transfer --rounds 5

demo: venv host-deps
	$(BIN)/python -m tests.vm.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
