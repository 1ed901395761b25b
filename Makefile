# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist); tests that share a compiled model stay on one
# worker (xdist_group). PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadgroup
DEMO_ARGS ?=
# The oldest triton the kernels are proven to compile with (pyproject's lower bound; the lent
# GPU machines carry it). Installed once beside the venv, only for the `compiled` tests, which
# compile the kernels with it in a subprocess. Install: 1.5 min, 640 MB, once. Cold compile and
# check of every launch, on this project's 2-core machine: one target with triton 3.9, 92 s idle;
# the three targets in pytest, 290 s at load ~3; the three with triton 3.6, 492 s at load ~6.
# Warm (Triton's kernel cache and fastadv's profile cache in ~/.triton) a target takes seconds.
TRITON_OLDEST ?= 3.6.0
TRITON_OLDEST_DIR ?= .cache/triton-$(TRITON_OLDEST)

.PHONY: venv triton-oldest test test-fast test-compiled demo bench docs clean

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

# make test compiles every kernel launch for sm_80/90/100 with the newest triton, and for sm_90 with
# the oldest; the oldest on sm_80/sm_100 (marker `sweep`) is left to `make test-compiled`.
test: venv triton-oldest
	$(BIN)/python -m pytest -m "not sweep" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not sweep" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Only the GPU-compile checks (sm_80/90/100, both tritons)
test-compiled: venv triton-oldest
	FASTADV_TRITON_OLDEST=$(TRITON_OLDEST_DIR) $(BIN)/python -m pytest -m compiled $(PYTEST_PARALLEL) $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m fastadv demo $(DEMO_ARGS)

# The CPU benchmark suite (one thread, CPU-time medians); on a GPU machine: bash benchmarks/gpu.sh all
bench: venv
	$(BIN)/python -m benchmarks.bench_kernels --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_attacks --quick --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_autoattack_cpu
	$(BIN)/python -m benchmarks.plot benchmarks/results

# The documentation site (site/): MkDocs with the reference pages built from the docstrings;
# --strict makes a broken link, anchor or reference an error.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .cache build dist *.egg-info .pytest_cache site
