"""Comparisons shared by the test suites: ``max|a - b| / max|a|`` (CONVENTIONS)."""

import numpy as np


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def tree_rel_err(got, want) -> float:
    """Largest ``rel_err`` over matching leaves of two pytrees (jax) or sequences."""
    import jax

    a, b = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(a) == len(b), (len(a), len(b))
    return max(rel_err(u, v) for u, v in zip(a, b))
