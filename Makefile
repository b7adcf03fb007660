# `make demo` runs the main job, `make test` the whole test suite. Both create (or reuse)
# a virtual environment in .venv and install the project with its extras into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test parity gpu gpu-smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,dev,gpu-compile]"
	touch $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m experiments.bench demo  # CPU unless asked otherwise

test: $(STAMP)
	$(PY) -m pytest -n 2 -q  # testpaths (pyproject.toml): tests, parity_tests

gpu:  # on a GPU machine with the packages installed (no venv): the headline benchmarks
	PYTHON=$${PYTHON:-python} experiments/gpu.sh

gpu-smoke: $(STAMP)  # the same parts on CPU with the smallest configs
	PYTHON=$(PY) experiments/gpu.sh --smoke results/gpu-smoke

parity: $(STAMP)
	$(PY) -m pytest -q parity_tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
