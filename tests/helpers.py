"""Comparisons shared by the test suites: ``max|a - b| / max|a|`` (docs/conventions.md)."""

from experiments.common import rel_err  # noqa: F401 (re-exported for the suites)


def tree_rel_err(got, want) -> float:
    """Largest ``rel_err`` over matching leaves of two pytrees (jax) or sequences."""
    import jax

    a, b = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(a) == len(b), (len(a), len(b))
    return max(rel_err(u, v) for u, v in zip(a, b))
