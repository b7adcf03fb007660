"""Test-wide settings, applied before JAX is imported.

XLA:CPU's LLVM optimisation dominates compile time for the many small functions the tests
build; the flags below halve it without changing what is computed (tolerances are unchanged).
Set REVJAX_TEST_FULL_OPT=1 to test with full optimisation.

PyTorch runs each test on one intra-op thread: the test models run thousands of tiny ops, and
with ``pytest -n 2`` on two cores every op would otherwise wait for a descheduled thread
(10-100x slower).
"""

import os
import sys

import pytest

if not os.environ.get("REVJAX_TEST_FULL_OPT"):
    _flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flags).strip()


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
