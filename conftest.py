"""Test-wide settings, applied before JAX is imported.

XLA:CPU's LLVM optimisation dominates compile time for the many small functions the tests
build; the flags below halve it without changing what is computed (tolerances are unchanged).
The legacy-emitter flag is left out where this jaxlib does not know it (checked once, in
a subprocess).
Set REVJAX_TEST_FULL_OPT=1 to test with full optimisation.

PyTorch runs each test on one intra-op thread: the test models run thousands of tiny ops, and
with ``pytest -n 2`` on two cores every op would otherwise wait for a descheduled thread
(10-100x slower).
"""

import os
import subprocess
import sys

import pytest

# With the CUDA plugin installed (the gpu-compile extra, for compiling for a GPU without
# one), jax would look for a GPU at start-up; the tests run on the CPU platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The legacy (non-MLIR) fusion emitters compile a third faster here (the Rev-MViT parity
# program: 40 s -> 28 s); added only where this jaxlib knows the flag.
_LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_CHECKED = "REVJAX_TEST_XLA_FLAGS"  # set once the flags are known good (xdist workers inherit)


def _accepted(xla_flags: str) -> bool:
    """Whether this jaxlib runs with ``xla_flags``: XLA aborts a process on a flag it does not
    know, and flags come and go between versions."""
    probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


if not os.environ.get("REVJAX_TEST_FULL_OPT") and _CHECKED not in os.environ:
    _base = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
    _with_emitters = f"{_base} {_LEGACY_EMITTERS}"
    os.environ["XLA_FLAGS"] = _with_emitters if _accepted(_with_emitters) else _base
    os.environ[_CHECKED] = os.environ["XLA_FLAGS"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch = sys.modules.get("torch")  # imported by the test modules that use it
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
