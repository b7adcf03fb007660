"""The GPU checks run both frameworks in one process: keep jax from preallocating most of
the GPU's memory (set before jax starts its backend; an explicit setting wins)."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
