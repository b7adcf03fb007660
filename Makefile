# `make demo` runs the main job, `make test` the whole test suite. Both create (or reuse)
# a virtual environment in .venv and install the project with its extras into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CUDA compile plugin (compiling for an H200 without a GPU) lives apart from the venv, so
# that `import jax` in the venv starts quietly on CPU; revjax.gpu runs the compiles that need
# it in a subprocess that sees it (revjax.gpu.plugin_env).
GPU_COMPILE := $(VENV)/gpu-compile
GPU_STAMP := $(GPU_COMPILE)/.installed

.PHONY: demo test parity gpu gpu-smoke clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y jax-cuda12-plugin jax-cuda12-pjrt 2>/dev/null || true  # an older venv's
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,dev]"
	touch $(STAMP)

$(GPU_STAMP): constraints.txt $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(GPU_COMPILE) -c constraints.txt \
		jax-cuda12-plugin jax-cuda12-pjrt
	touch $(GPU_STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m experiments.bench demo  # CPU unless asked otherwise

test: $(STAMP) $(GPU_STAMP)
	$(PY) -m pytest -n 2 -q  # testpaths (pyproject.toml): tests, parity_tests

gpu:  # on a GPU machine with the packages installed (no venv): the headline benchmarks
	PYTHON=$${PYTHON:-python} experiments/gpu.sh

gpu-smoke: $(STAMP)  # the same parts on CPU with the smallest configs
	PYTHON=$(PY) experiments/gpu.sh --smoke results/gpu-smoke

parity: $(STAMP)
	$(PY) -m pytest -q parity_tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
