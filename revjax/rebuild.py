"""The rebuild check: how far the inputs the backward rebuilds are from the true ones.

``rebuild_errors`` runs a forward that stores every layer's input pair and the inverse from
the top, as the backward runs it (same precision policy, restarting at the same anchors),
and returns the per-layer relative error; ``check_rebuild`` reads it on the host and raises
``RebuildError`` (or warns) past a threshold, naming the layer. docs/numerics.md has the
measurements.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .core import Fn, PyTree, check_inputs, layer_forward
from .numerics import anchor_every_of, stream_dtype_of, with_policy

CHECK_ACTIONS = ("raise", "warn")


class RebuildError(ValueError):
    """A rebuilt activation differs from the stored one by more than the threshold; the
    per-layer errors are in ``.errors``."""

    def __init__(self, message: str, errors=None):
        super().__init__(message)
        self.errors = errors


def rebuild_errors(f: Fn, g: Fn, params_f: PyTree, params_g: PyTree, x1, x2, shared=(),
                   per_layer=None, *, stream_dtype: Any = None,
                   anchor_every: int | None = None) -> jax.Array:
    """Per-layer relative error of the inputs the backward rebuilds, against stored ones.

    A forward stores every layer's input pair; the inverse, run from the top as the backward
    runs it (same ``stream_dtype`` policy, restarting at the anchors of ``anchor_every``),
    rebuilds them. Entry i is ``max`` over the two streams of ``max|rebuilt - stored| /
    max|stored|`` for layer i's input (0 where an anchor gives it exactly), in float32 (or
    float64 for float64 streams). Traceable; returns an array of shape ``(depth,)``.
    """
    per_layer = {} if per_layer is None else dict(per_layer)
    check_inputs(params_f, params_g, x1, x2, per_layer, "reprop")
    f, g, x1, x2 = with_policy(f, g, x1, x2, stream_dtype_of(stream_dtype))
    every = anchor_every_of(anchor_every)
    shared = tuple(shared)

    def forward(x, xs):
        pf, pg, pl = xs
        return layer_forward(f, g, pf, pg, *x, shared, pl), x

    def back(y, xs):
        i, pf, pg, pl, s1, s2 = xs
        exact = (lambda s, r: r) if every is None else (
            lambda s, r: jnp.where(i % every == 0, s, r))
        r2 = exact(s2, y[1] - g(pg, y[0], *shared, **pl))
        r1 = exact(s1, y[0] - f(pf, r2, *shared, **pl))
        return (r1, r2), (r1, r2)

    depth = jax.tree.leaves((params_f, params_g))[0].shape[0]
    y, stored = lax.scan(forward, (x1, x2), (params_f, params_g, per_layer))
    _, rebuilt = lax.scan(back, y, (jnp.arange(depth), params_f, params_g, per_layer,
                                    *stored), reverse=True)
    acc = jnp.promote_types(x1.dtype, jnp.float32)
    axes = tuple(range(1, x1.ndim + 1))

    def err(r, s):
        r, s = r.astype(acc), s.astype(acc)
        scale = jnp.max(jnp.abs(s), axis=axes)
        diff = jnp.max(jnp.abs(r - s), axis=axes)
        return jnp.where(scale > 0, diff / jnp.where(scale > 0, scale, 1), diff)

    return jnp.maximum(*(err(r, s) for r, s in zip(rebuilt, stored)))


def check_rebuild(f: Fn, g: Fn, params_f: PyTree, params_g: PyTree, x1, x2, shared=(),
                  per_layer=None, *, threshold: float = 1e-2, on_error: str = "raise",
                  stream_dtype: Any = None, anchor_every: int | None = None) -> np.ndarray:
    """Check that the backward's rebuild is exact enough: ``rebuild_errors`` on the host.

    Returns the per-layer errors (numpy, shape ``(depth,)``). When one passes ``threshold``
    (or is not finite), raises ``RebuildError`` (``on_error="raise"``) or warns with a
    ``RuntimeWarning`` (``"warn"``), naming the first layer from the top over the threshold,
    its error and the worst layer. Runs eagerly (outside ``jax.jit``): it reads the errors.
    """
    check_options(threshold, on_error)
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((x1, x2, params_f))):
        raise TypeError("check_rebuild compares values on the host: call it outside "
                        "jax.jit/grad (on concrete arrays); use rebuild_errors when tracing")
    errors = np.asarray(jax.jit(partial(
        rebuild_errors, f, g, stream_dtype=stream_dtype, anchor_every=anchor_every))(
        params_f, params_g, x1, x2, tuple(shared), per_layer))
    report_rebuild(errors, threshold, on_error, stacklevel=3)
    return errors


def check_options(threshold, on_error):
    if on_error not in CHECK_ACTIONS:
        raise ValueError(f"on_error must be one of {CHECK_ACTIONS}, got {on_error!r}")
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive relative error, got {threshold!r}")


def report_rebuild(errors, threshold: float, on_error: str = "raise", where: str = "",
                   stacklevel: int = 2) -> None:
    """Raise ``RebuildError`` or warn (``on_error``) when a per-layer error passes
    ``threshold`` or is not finite; ``where`` names the stack in the message."""
    message = _message(np.asarray(errors, np.float64), threshold, where)
    if message is None:
        return
    if on_error == "raise":
        raise RebuildError(message, errors)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _message(errors, threshold: float, where: str) -> str | None:
    """The check's message for per-layer ``errors`` (None when all pass ``threshold``)."""
    bad = [i for i, e in enumerate(errors) if not e <= threshold]
    if not bad:
        return None
    first, worst = bad[-1], int(np.nanargmax(np.where(np.isnan(errors), np.inf, errors)))
    return (f"reversible rebuild check{where}: the rebuilt input of layer {first} (of "
            f"{len(errors)}, rebuilt from the top) has relative error {errors[first]:.3g} > "
            f"threshold {threshold:g} (max|rebuilt - stored| / max|stored|); worst: layer "
            f"{worst}, {errors[worst]:.3g}; {len(bad)} layer(s) over. The backward's "
            "activations, and so the gradients, are that far off: keep the streams in "
            "float32 (stream_dtype='float32'), add anchors (anchor_every=k), or compute in "
            "a wider dtype.")
