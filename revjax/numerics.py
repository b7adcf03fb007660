"""The numerics options of the reversible stack: the precision policy and anchors.

* ``stream_dtype``: ``None`` keeps the streams in the inputs' dtype; a floating dtype (e.g.
  ``"float32"`` with bfloat16 inputs) holds both streams, their additions and the inverse's
  subtractions in it while F and G compute in the inputs' dtype: each half gets its input
  cast down and its output cast up before the addition (``with_policy``).
* ``anchor_every=k``: the forward also stores the exact stream pair entering layers 0, k,
  2k, ... (one pair per anchor) and the backward's rebuild restarts from it there, so the
  rebuild drift spans at most k layers (``keep_anchor`` / ``anchor_at``).

docs/numerics.md has the measurements.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def stream_dtype_of(stream_dtype):
    """``stream_dtype`` (None, a name like ``"float32"`` or a dtype) as a floating dtype."""
    if stream_dtype is None:
        return None
    try:
        dtype = jnp.dtype(stream_dtype)
    except TypeError:
        raise ValueError(f"unknown stream_dtype {stream_dtype!r}; use None or a floating "
                         "dtype such as 'float32'") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"stream_dtype must be a floating dtype, got {dtype}")
    return dtype


def anchor_every_of(anchor_every):
    """``anchor_every``: None or a positive int."""
    if anchor_every is None:
        return None
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, (int, np.integer)):
        raise TypeError(f"anchor_every must be None or an int, got {anchor_every!r}")
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be at least 1 (or None), got {anchor_every}")
    return int(anchor_every)


def _in_compute(fn, compute, stream):
    """The precision policy for one half: ``fn`` runs on its input cast to ``compute`` (the
    model's dtype) and its output is cast back to ``stream`` before the residual addition."""
    def half(p, x, *shared, **pl):
        return fn(p, x.astype(compute), *shared, **pl).astype(stream)

    return half


def with_policy(f, g, x1, x2, stream):
    """``(f, g, x1, x2)`` under the precision policy: the streams cast to ``stream`` and the
    halves computing in the inputs' dtype (``_in_compute``); unchanged when that is
    ``stream`` already or ``stream`` is None."""
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if stream is None or stream == x1.dtype:
        return f, g, x1, x2
    compute = x1.dtype
    return (_in_compute(f, compute, stream), _in_compute(g, compute, stream),
            x1.astype(stream), x2.astype(stream))


def empty_anchors(x1, x2, depth: int, every: int):
    """The anchor buffers for a stack of ``depth`` layers: ``ceil(depth / every)`` pairs."""
    n = -(-depth // every)
    return tuple(jnp.zeros((n, *x.shape), x.dtype) for x in (x1, x2))


def keep_anchor(anchors, x, i, every):
    """Write the stream pair ``x`` entering layer i into its anchor slot when i % every == 0."""
    slot, keep = i // every, i % every == 0
    return tuple(lax.dynamic_update_index_in_dim(
        a, jnp.where(keep, v, lax.dynamic_index_in_dim(a, slot, keepdims=False)), slot, 0)
        for a, v in zip(anchors, x))


def anchor_at(anchors, i, every):
    """``(is_anchor, a1, a2)`` for layer i's input (i may be traced), or None without anchors."""
    if anchors is None:
        return None
    a1, a2 = (lax.dynamic_index_in_dim(a, i // every, keepdims=False) for a in anchors)
    return i % every == 0, a1, a2
