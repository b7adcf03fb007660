"""The reversible stack as pure JAX: one ``custom_vjp`` around all layers.

Layer i maps ``(X1, X2)`` to ``(Y1, Y2)`` in two halves, F then G::

    Y1 = X1 + F(X2)          X2 = Y2 - G(Y1)      (inverse, used by the backward)
    Y2 = X2 + G(Y1)          X1 = Y1 - F(X2)

The backward walks the halves from the top, G_{D-1}, F_{D-1}, G_{D-2}, ..., along two chains:

* the rebuild chain: ``rebuild_g`` takes ``(Y1, Y2)`` to ``(Y1, X2)`` and keeps G's VJP;
  ``rebuild_f`` takes ``(Y1, X2)`` to ``(X1, X2)`` and keeps F's VJP. It needs no gradient.
* the gradient chain: ``grad_g`` pulls ``(dY1, dY2)`` through G's kept VJP
  (``dX1 = dY1 + dG^T dY2``, and G's parameter gradient); ``grad_f`` pulls that through F's
  (``dX2 = dY2 + dF^T dX1``). Half k needs the residuals of half k's rebuild and the
  cotangents of half k-1.

Backward modes (``MODES``):

* ``backprop``: plain autodiff through the forward scan; stores every layer's activations.
* ``reprop`` (Mangalam et al., 2022): per layer from the top, rebuild G and F, then their
  gradients. The peak holds one layer's residuals (G's and F's).
* ``pareprop`` (Zhu et al., 2023), at the granularity of halves: the gradient of half k and
  the rebuild of half k+1 share no data (the rebuild needs only half k's rebuilt streams),
  so each step runs them side by side (``streams.side_by_side``: separate threads on
  XLA:CPU, CUDA streams on XLA:GPU with ``streams.GPU_STREAMS``). A half's residuals live
  from its rebuild, one step, to its gradient, the next: the peak holds two halves'
  residuals, as reprop's does, and the cost stays one forward and one backward per layer.
  docs/pareprop.md has the dependency argument and the measurements.

Numerics options (``numerics``): ``stream_dtype`` (the precision policy) and
``anchor_every`` (exact stream pairs stored every k layers, where the rebuild restarts); the
rebuild check is in ``rebuild``.

References: Gomez et al., "The Reversible Residual Network", 2017; Mangalam et al.,
arXiv:2302.04869; Zhu et al., "PaReprop: Fast Parallelized Reversible Backpropagation",
arXiv:2306.09342.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import streams
from .numerics import anchor_at, anchor_every_of, empty_anchors, keep_anchor, \
    stream_dtype_of, with_policy

MODES = ("backprop", "reprop", "pareprop")
DEFAULT_MODE = "reprop"  # models' and stacks' mode when none is given (README: why)

Fn = Callable[..., jax.Array]  # f(params_i, x, *shared, **per_layer_i) -> array like x
PyTree = Any


def check_inputs(params_f, params_g, x1, x2, per_layer, mode) -> int:
    """Validate inputs; return the depth (size of the stacked leading axis)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if x1.shape != x2.shape or x1.dtype != x2.dtype:
        raise ValueError(
            "the two streams must match in shape and dtype, got "
            f"x1 {x1.dtype}{list(x1.shape)} and x2 {x2.dtype}{list(x2.shape)}")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
             for leaf in jax.tree.leaves((params_f, params_g, per_layer))}
    if not sizes:
        raise ValueError("params_f/params_g are empty: cannot infer the depth")
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "params and per_layer leaves must share one leading depth axis, "
            f"got leading sizes {sorted(s for s in sizes if s is not None)}"
            + (" and scalars" if None in sizes else ""))
    (depth,) = sizes
    if depth < 1:
        raise ValueError("depth must be at least 1 (the stacked leading axis is empty)")
    return depth


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_cotangent(x):
    """A zero cotangent for a non-differentiated input (float0 for ints and keys)."""
    return jnp.zeros_like(x) if _inexact(x) else np.zeros(x.shape, dtype=jax.dtypes.float0)


def _at(tree, i):
    """Layer i's slice of a tree stacked on a leading depth axis (i may be traced)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


# ------------------------------------------------------------------------- one layer


def layer_forward(f, g, pf, pg, x1, x2, shared, pl):
    """Forward of one layer: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``."""
    y1 = x1 + f(pf, x2, *shared, **pl)
    y2 = x2 + g(pg, y1, *shared, **pl)
    return y1, y2


# What pareprop's kept VJPs store, as a ``jax.checkpoint`` policy: the outputs of matmuls
# without batch dimensions; elementwise results (GELU, LayerNorm) and attention's batched
# products are recomputed by the gradient piece. A half's residuals travel in the loop carry
# from one step to the next, where XLA cannot fuse them away as it does inside reprop's step
# (H200 compile, per sample: ViT-L pareprop 35.6 -> 18.7 MiB; docs/pareprop.md). reprop keeps
# what ``jax.vjp`` keeps.
PAREPROP_RESIDUALS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _kept_vjp(fn, p, x, shared, pl, policy=None):
    """``fn(p, x, *shared, **pl)`` with its VJP flattened to arrays (for a scan carry).

    Residual leaves that *are* one of the half's inputs (its parameters, its input ``x``,
    ``shared``, ``pl``: the step has them again) are left out. Returns ``(out, residual
    leaves, spec)``; ``spec`` is static and the same at every layer. ``policy``: what the VJP
    stores (a ``jax.checkpoint`` policy; None: what ``jax.vjp`` stores).
    """
    body = lambda p, x: fn(p, x, *shared, **pl)
    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    out, vjp = jax.vjp(body, p, x)
    leaves, treedef = jax.tree.flatten(vjp)
    known_ids = {id(k): n for n, k in enumerate(jax.tree.leaves((p, x, shared, pl)))}
    slots = tuple(known_ids.get(id(leaf)) for leaf in leaves)
    return out, [leaf for leaf, s in zip(leaves, slots) if s is None], (treedef, slots)


def _apply_vjp(spec, res, p, x, shared, pl, cotangent):
    """The kept VJP of a half (``_kept_vjp``) applied: ``(dp, dx)``."""
    treedef, slots = spec
    known, it = jax.tree.leaves((p, x, shared, pl)), iter(res)
    return jax.tree.unflatten(treedef, [next(it) if s is None else known[s] for s in slots])(
        cotangent)


def rebuild_g(g, pg, y1, y2, shared, pl, anchor=None, policy=None):
    """``X2 = Y2 - G(Y1)``, keeping G's VJP: ``(x2, residuals, spec)``. With ``anchor =
    (is_anchor, a1, a2)`` the stored exact X2 replaces the rebuilt one where ``is_anchor``."""
    out, res, spec = _kept_vjp(g, pg, y1, shared, pl, policy)
    x2 = y2 - out
    return (x2 if anchor is None else jnp.where(anchor[0], anchor[2], x2)), res, spec


def rebuild_f(f, pf, y1, x2, shared, pl, anchor=None, policy=None):
    """``X1 = Y1 - F(X2)``, keeping F's VJP: ``(x1, residuals, spec)`` (``anchor``: as
    ``rebuild_g``'s, for X1)."""
    out, res, spec = _kept_vjp(f, pf, x2, shared, pl, policy)
    x1 = y1 - out
    return (x1 if anchor is None else jnp.where(anchor[0], anchor[1], x1)), res, spec


def grad_g(spec, res, pg, y1, shared, pl, dy1, dy2):
    """Through ``Y2 = X2 + G(Y1)``: ``(dX1, dPg)``; dX1 is all of dY1, since also
    ``Y1 = X1 + F(X2)``."""
    dpg, dy1_g = _apply_vjp(spec, res, pg, y1, shared, pl, dy2)
    return dy1 + dy1_g, dpg


def grad_f(spec, res, pf, x2, shared, pl, dx1, dy2):
    """Through ``Y1 = X1 + F(X2)``: ``(dX2, dPf)``."""
    dpf, dx2_f = _apply_vjp(spec, res, pf, x2, shared, pl, dx1)
    return dy2 + dx2_f, dpf


# -------------------------------------------------------------------------- the stack


def _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer, anchor_every=None):
    """The stack's outputs ``(Y1, Y2)`` and the anchors (None without ``anchor_every``)."""
    depth = jax.tree.leaves((params_f, params_g))[0].shape[0]
    anchors = None if anchor_every is None else empty_anchors(x1, x2, depth, anchor_every)

    def step(carry, xs):
        x, anchors = carry
        i, pf, pg, pl = xs
        if anchors is not None:
            anchors = keep_anchor(anchors, x, i, anchor_every)
        return (layer_forward(f, g, pf, pg, *x, shared, pl), anchors), None

    return lax.scan(step, ((x1, x2), anchors),
                    (jnp.arange(depth), params_f, params_g, per_layer))[0]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _reversible(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared, per_layer):
    return _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer)[0]


def _reversible_fwd(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared, per_layer):
    y, anchors = _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer,
                               anchor_every)
    # no per-layer activations: the outputs, and one stream pair per anchor
    return y, (y, anchors, params_f, params_g, shared, per_layer)


def _reversible_bwd(f, g, mode, anchor_every, saved, dy):
    # Always traced (also under eager jax.grad) so that the prologue's residual layout is
    # the one the scan step produces: parameters are then recognised by identity.
    return jax.jit(partial(_backward, f, g, mode, anchor_every))(saved, dy)


def _backward(f, g, mode, anchor_every, saved, dy):
    (y1, y2), anchors, params_f, params_g, shared, per_layer = saved
    depth = jax.tree.leaves((params_f, params_g))[0].shape[0]
    anchor = lambda i: anchor_at(anchors, i, anchor_every)
    grads0 = jax.tree.map(jnp.zeros_like, (params_f, params_g))

    def put(grads, i, dpf, dpg):  # layer i's parameter gradients into the stacked buffers
        return jax.tree.map(lambda a, d: lax.dynamic_update_index_in_dim(a, d, i, 0)
                            if _inexact(a) else a, grads, (dpf, dpg))

    if mode == "reprop":
        def step(carry, i):
            (y1, y2), (dy1, dy2), grads = carry
            pf, pg, pl = _at((params_f, params_g, per_layer), i)
            x2, res_g, spec_g = rebuild_g(g, pg, y1, y2, shared, pl, anchor(i))
            x1, res_f, spec_f = rebuild_f(f, pf, y1, x2, shared, pl, anchor(i))
            dx1, dpg = grad_g(spec_g, res_g, pg, y1, shared, pl, dy1, dy2)
            dx2, dpf = grad_f(spec_f, res_f, pf, x2, shared, pl, dx1, dy2)
            return ((x1, x2), (dx1, dx2), put(grads, i, dpf, dpg)), None

        (_, dx, grads), _ = lax.scan(step, ((y1, y2), dy, grads0), jnp.arange(depth),
                                     reverse=True)
    else:  # pareprop: the gradient of each half beside the rebuild of the next
        # Prologue: rebuild G of the top layer. The slices of G's parameters and of the
        # per-layer inputs travel with G's residuals to the step that differentiates them.
        # The barrier ties the rebuild to the cotangent's arrival: it needs none, and would
        # otherwise be free to start at the beginning of the whole backward (every stage of
        # a hierarchical model holding its top residuals at once).
        (y1, y2), dy = lax.optimization_barrier(((y1, y2), dy))
        pg_top, pl_top = _at((params_g, per_layer), depth - 1)
        x2_top, res_g_top, spec_g = rebuild_g(g, pg_top, y1, y2, shared, pl_top,
                                              anchor(depth - 1), PAREPROP_RESIDUALS)

        def step(carry, i):
            """Layer i: (a) G's gradient beside F's rebuild; (b) F's gradient beside the
            rebuild of G of layer i-1."""
            (y1, x2, pg, pl, res_g), (dy1, dy2), grads = carry
            pf, spec_f = _at(params_f, i), []

            def rebuild_f_piece(y1, x2):  # arrays out (a stream region's outputs); spec aside
                x1, res_f, spec = rebuild_f(f, pf, y1, x2, shared, pl, anchor(i),
                                            PAREPROP_RESIDUALS)
                spec_f[:] = [spec]
                return x1, res_f

            (dx1, dpg), (x1, res_f) = streams.side_by_side(
                partial(grad_g, spec_g), (res_g, pg, y1, shared, pl, dy1, dy2),
                rebuild_f_piece, (y1, x2))
            # Both pieces of (a) end before (b) starts: the rebuild chain may not run ahead
            # of the gradient chain, which would keep G_i's residuals alive beside G_{i-1}'s.
            x1, dx1 = lax.optimization_barrier((x1, dx1))

            def rebuild_next(x1, x2):
                # Layer 0 has no layer below: its step rebuilds G_0 again, and the result is
                # dropped. Every layer's step then runs inside one loop; the last step kept
                # outside it was left for XLA to schedule freely among the rest of the
                # backward, which held its residuals far longer (docs/pareprop.md).
                below = jnp.maximum(i - 1, 0)
                pg_p, pl_p = _at((params_g, per_layer), below)
                x2_p, res_g_p, spec = rebuild_g(g, pg_p, x1, x2, shared, pl_p, anchor(below),
                                                PAREPROP_RESIDUALS)
                if spec[1] != spec_g[1]:
                    raise AssertionError("G's residual layout changed between layers")
                return x2_p, pg_p, pl_p, res_g_p

            (dx2, dpf), nxt = streams.side_by_side(
                partial(grad_f, spec_f[0]), (res_f, pf, x2, shared, pl, dx1, dy2),
                rebuild_next, (x1, x2))
            return ((x1, *nxt), (dx1, dx2), put(grads, i, dpf, dpg)), None

        carry = ((y1, x2_top, pg_top, pl_top, res_g_top), dy, grads0)
        (_, dx, grads), _ = lax.scan(step, carry, jnp.arange(depth), reverse=True)

    grads = jax.tree.map(lambda p, d: d if _inexact(p) else _zero_cotangent(p),
                         (params_f, params_g), grads)
    zero = lambda t: jax.tree.map(_zero_cotangent, t)
    return (*grads, *dx, zero(shared), zero(per_layer))


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible(
    f: Fn,
    g: Fn,
    params_f: PyTree,
    params_g: PyTree,
    x1: jax.Array,
    x2: jax.Array,
    shared: tuple = (),
    per_layer: dict | None = None,
    *,
    mode: str,
    stream_dtype: Any = None,
    anchor_every: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run a stack of reversible layers; return the final ``(Y1, Y2)``.

    Args:
      f, g: pure functions ``f(params_i, x, *shared, **per_layer_i) -> array`` of x's
        shape and dtype, the two halves of a layer (F: attention, G: MLP in a transformer).
        Both receive the same ``shared`` and ``per_layer`` slice.
      params_f, params_g: parameter pytrees whose leaves are stacked on a leading depth axis.
      x1, x2: the two input streams (same shape and dtype).
      shared: arrays the same for every layer (masks, positions). Not differentiated: they
        are wrapped in ``stop_gradient``, so their gradient is exactly zero.
      per_layer: dict of arrays stacked on the leading depth axis (e.g. alternating Swin
        shifts, dropout keys); layer i gets ``per_layer[k][i]``. Not differentiated either.
      mode: one of ``MODES``; ``backprop`` stores activations, ``reprop`` and ``pareprop``
        store only the final outputs and rebuild the rest in the backward.
      stream_dtype: the precision policy (every mode). None: the streams stay in the
        inputs' dtype. A floating dtype (e.g. ``"float32"`` with bfloat16 inputs): both
        streams, their additions and the inverse's subtractions are held in it, while F and
        G compute in the inputs' dtype (each gets its input cast to that dtype, and its
        output is cast to ``stream_dtype`` before the addition). ``(Y1, Y2)`` come back in
        ``stream_dtype``; the gradients of x1, x2 in their own dtype.
      anchor_every: None, or k >= 1 (``reprop``/``pareprop``; ``backprop`` ignores it): the
        forward also stores the exact stream pair entering layers 0, k, 2k, ... (one pair
        per anchor, ``ceil(depth / k)`` in all) and the backward restarts its rebuild from
        them, so rounding drift accumulates over at most k layers.

    Raises:
      ValueError: unknown mode, streams differing in shape or dtype, depth 0, leaves that
        disagree on the depth, an unknown or non-floating ``stream_dtype``, or
        ``anchor_every < 1``.
    """
    per_layer = {} if per_layer is None else dict(per_layer)
    check_inputs(params_f, params_g, x1, x2, per_layer, mode)
    f, g, x1, x2 = with_policy(f, g, x1, x2, stream_dtype_of(stream_dtype))
    anchor_every = anchor_every_of(anchor_every)
    shared = jax.tree.map(lax.stop_gradient, tuple(shared))
    per_layer = jax.tree.map(lax.stop_gradient, per_layer)
    if mode == "backprop":
        return _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer)[0]
    return _reversible(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared,
                       per_layer)


def invert(f: Fn, g: Fn, params_f: PyTree, params_g: PyTree, y1, y2, shared=(),
           per_layer=None) -> tuple[jax.Array, jax.Array]:
    """Rebuild the stack's inputs ``(X1, X2)`` from its outputs, layer by layer from the top."""
    per_layer = {} if per_layer is None else dict(per_layer)

    def step(y, xs):
        pf, pg, pl = xs
        x2 = y[1] - g(pg, y[0], *shared, **pl)
        return (y[0] - f(pf, x2, *shared, **pl), x2), None

    return lax.scan(step, (y1, y2), (params_f, params_g, per_layer), reverse=True)[0]
