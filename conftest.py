"""Test-wide settings, applied before JAX is imported.

XLA:CPU's LLVM optimisation dominates compile time for the many small functions the tests
build; the flags below halve it without changing what is computed (tolerances are unchanged).
Set REVJAX_TEST_FULL_OPT=1 to test with full optimisation.
"""

import os

if not os.environ.get("REVJAX_TEST_FULL_OPT"):
    _flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flags).strip()
