# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=
# The oldest triton the kernels are proven to compile with (pyproject's lower bound; the lent
# GPU machines carry it). Installed once beside the venv, only for the `compiled` tests, which
# compile every kernel with it in a subprocess. Install: 1.5 min, 640 MB, once. Compiling and
# checking all kernels for one target, measured on the shared 2-core machine (load ~20): 2497 s
# cold, 36 s (16 s CPU) warm, from Triton's kernel cache and fastadv's profile cache in ~/.triton.
TRITON_OLDEST ?= 3.6.0
TRITON_OLDEST_DIR ?= .cache/triton-$(TRITON_OLDEST)

.PHONY: venv triton-oldest test test-fast test-compiled demo bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The reference libraries pin torchvision and old requests: install them without deps.
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1 pyautoattack==0.2.0
	touch $@

venv: $(BIN)/.installed

$(TRITON_OLDEST_DIR)/.installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet --no-deps --target $(TRITON_OLDEST_DIR) "triton==$(TRITON_OLDEST)"
	touch $@

triton-oldest: $(TRITON_OLDEST_DIR)/.installed

# The full compile sweep (marker `sweep`) is left to `make test-compiled`: cold, it takes tens of
# minutes per target on a 2-core machine, past CI's budget.
test: venv
	$(BIN)/python -m pytest -m "not sweep" $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not sweep" $(PYTEST_ARGS)

# Only the GPU-compile checks (sm_80/90/100, both tritons)
test-compiled: venv triton-oldest
	FASTADV_TRITON_OLDEST=$(TRITON_OLDEST_DIR) $(BIN)/python -m pytest -m compiled $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m fastadv demo $(DEMO_ARGS)

# The CPU benchmark suite (one thread, CPU-time medians); on a GPU machine: bash benchmarks/gpu.sh all
bench: venv
	$(BIN)/python -m benchmarks.bench_kernels --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_attacks --quick --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_autoattack_cpu
	$(BIN)/python -m benchmarks.plot benchmarks/results

clean:
	rm -rf $(VENV) .cache build dist *.egg-info .pytest_cache
