# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test test-fast demo bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The reference libraries pin torchvision and old requests: install them without deps.
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1 pyautoattack==0.2.0
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m fastadv demo $(DEMO_ARGS)

# The CPU benchmark suite (one thread, CPU-time medians); on a GPU machine: bash benchmarks/gpu.sh all
bench: venv
	$(BIN)/python -m benchmarks.bench_kernels --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_attacks --quick --threads 1 --clock cpu --quiet
	$(BIN)/python -m benchmarks.bench_autoattack_cpu
	$(BIN)/python -m benchmarks.plot benchmarks/results

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
