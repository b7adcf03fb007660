"""The reversible stack as pure JAX: one ``custom_vjp`` around all layers.

Layer i maps ``(X1, X2)`` to ``(Y1, Y2)``::

    Y1 = X1 + F(X2)          X2 = Y2 - G(Y1)      (inverse, used by the backward)
    Y2 = X2 + G(Y1)          X1 = Y1 - F(X2)

Backward modes (``MODES``):

* ``backprop``: plain autodiff through the forward scan; stores every layer's activations.
* ``reprop``: the forward stores only the final ``(Y1, Y2)``. A reverse scan rebuilds each
  layer's input from its output through ``jax.vjp`` of G and F and pulls the cotangents
  through those VJPs straight away (Mangalam et al., "Reversible Vision Transformers", 2022).
* ``pareprop``: the same work, scheduled as in PaReprop (Zhu et al., 2023): step i applies
  the kept VJPs of layer i to the cotangents *and* rebuilds layer i-1 from layer i's rebuilt
  input. The two halves share no data, so XLA may run them at once; on GPU they are put on
  separate streams. Residuals travel in the scan carry as arrays.

Numerics options (``reversible``; docs/numerics.md has the measurements):

* ``stream_dtype``: the precision policy. ``None`` keeps the streams in the inputs' dtype;
  e.g. ``"float32"`` with bfloat16 inputs holds both streams (and the inverse's subtraction)
  in float32 while F and G compute in the inputs' dtype: each half gets its input cast down
  and its output cast up before the addition.
* ``anchor_every=k``: the forward also stores the exact stream pair entering layers 0, k,
  2k, ... (one pair per anchor) and the backward's rebuild restarts from it there, so the
  rebuild drift spans at most k layers. ``backprop`` ignores it.
* ``check_rebuild`` / ``rebuild_errors``: the per-layer relative error of the rebuilt inputs
  against stored ones, raising (or warning) past a threshold, with the layer named.

References: Gomez et al., "The Reversible Residual Network", 2017; Mangalam et al.,
arXiv:2302.04869; Zhu et al., "PaReprop: Fast Parallelized Reversible Backpropagation",
arXiv:2306.09342.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

MODES = ("backprop", "reprop", "pareprop")

Fn = Callable[..., jax.Array]  # f(params_i, x, *shared, **per_layer_i) -> array like x
PyTree = Any


# --------------------------------------------------------------------------- checks


def _check(params_f, params_g, x1, x2, per_layer, mode) -> int:
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


def _stream_dtype(stream_dtype):
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


def _anchor_every(anchor_every):
    """``anchor_every``: None or a positive int."""
    if anchor_every is None:
        return None
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, (int, np.integer)):
        raise TypeError(f"anchor_every must be None or an int, got {anchor_every!r}")
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be at least 1 (or None), got {anchor_every}")
    return int(anchor_every)


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_cotangent(x):
    """A zero cotangent for a non-differentiated input (float0 for ints and keys)."""
    if _inexact(x):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _at(tree, i):
    """Layer i's slice of a tree stacked on a leading depth axis (i may be traced)."""
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


# ------------------------------------------------------------------------- one layer


def _layer(f, g, pf, pg, x1, x2, shared, pl):
    """Forward of one layer: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``."""
    y1 = x1 + f(pf, x2, *shared, **pl)
    y2 = x2 + g(pg, y1, *shared, **pl)
    return y1, y2


def _in_compute(fn, compute, stream):
    """The precision policy for one half: ``fn`` runs on its input cast to ``compute`` (the
    model's dtype) and its output is cast back to ``stream`` before the residual addition."""
    def half(p, x, *shared, **pl):
        return fn(p, x.astype(compute), *shared, **pl).astype(stream)

    return half


def _anchor_at(anchors, i, every):
    """``(is_anchor, a1, a2)`` for layer i's input (i may be traced), or None without anchors."""
    if anchors is None:
        return None
    a1, a2 = (lax.dynamic_index_in_dim(a, i // every, keepdims=False) for a in anchors)
    return i % every == 0, a1, a2


def _keep_anchor(anchors, x, i, every):
    """Write the stream pair ``x`` entering layer i into its anchor slot when i % every == 0."""
    slot, keep = i // every, i % every == 0
    return tuple(lax.dynamic_update_index_in_dim(
        a, jnp.where(keep, v, lax.dynamic_index_in_dim(a, slot, keepdims=False)), slot, 0)
        for a, v in zip(anchors, x))


def _vjp_leaves(fn, known, *primals):
    """``jax.vjp(fn, *primals)`` with the VJP flattened to arrays for a scan carry.

    Residual leaves that *are* one of ``known`` (this layer's parameters and inputs, which
    the step can index again) are left out of the carry; ``rebuild`` puts them back.
    Returns ``(out, carried_leaves, spec)``; ``spec`` is static.
    """
    out, vjp = jax.vjp(fn, *primals)
    leaves, treedef = jax.tree.flatten(vjp)
    known_ids = {id(k): n for n, k in enumerate(known)}
    slots = tuple(known_ids.get(id(leaf)) for leaf in leaves)
    carried = [leaf for leaf, s in zip(leaves, slots) if s is None]
    return out, carried, (treedef, slots)


def _unflatten_vjp(spec, carried, known):
    treedef, slots = spec
    it = iter(carried)
    leaves = [next(it) if s is None else known[s] for s in slots]
    return jax.tree.unflatten(treedef, leaves)


def _rebuild(f, g, pf, pg, y1, y2, shared, pl, anchor=None):
    """Invert one layer keeping the VJPs of G and F: ``X2 = Y2 - G(Y1)``, ``X1 = Y1 - F(X2)``.

    With ``anchor = (is_anchor, a1, a2)`` (``_anchor_at``) the stored exact inputs replace the
    rebuilt ones where ``is_anchor``, F's VJP included. Returns ``((x1, x2), residual leaves,
    static spec)``.
    """
    pick = (lambda exact, rebuilt: jnp.where(anchor[0], exact, rebuilt)) if anchor else None
    known_g = tuple(jax.tree.leaves((pg, shared, pl)))
    known_f = tuple(jax.tree.leaves((pf, shared, pl)))
    g_out, res_g, spec_g = _vjp_leaves(lambda p, y: g(p, y, *shared, **pl), known_g, pg, y1)
    x2 = y2 - g_out if pick is None else pick(anchor[2], y2 - g_out)
    f_out, res_f, spec_f = _vjp_leaves(lambda p, x: f(p, x, *shared, **pl), known_f, pf, x2)
    x1 = y1 - f_out if pick is None else pick(anchor[1], y1 - f_out)
    return (x1, x2), (res_g, res_f), (spec_g, spec_f)


def _grads(spec, res, pf, pg, shared, pl, dy1, dy2):
    """Pull ``(dY1, dY2)`` through layer i's kept VJPs: returns ``(dX1, dX2), (dPf, dPg)``."""
    spec_g, spec_f = spec
    vjp_g = _unflatten_vjp(spec_g, res[0], tuple(jax.tree.leaves((pg, shared, pl))))
    vjp_f = _unflatten_vjp(spec_f, res[1], tuple(jax.tree.leaves((pf, shared, pl))))
    dpg, dy1_g = vjp_g(dy2)            # Y2 = X2 + G(Y1)
    dx1 = dy1 + dy1_g                  # dY1 in total, which is also dX1 (Y1 = X1 + F(X2))
    dpf, dx2_f = vjp_f(dx1)
    dx2 = dy2 + dx2_f
    return (dx1, dx2), (dpf, dpg)


# ----------------------------------------------------------------------- GPU streams

# Call-like primitives whose body is spliced into a stream region (param holding the body).
# Inside a region XLA keeps every nested call as an un-inlineable call on the stream and then
# cannot give it a stream of its own ("No ExecutionStreamId found"), so a region must be flat.
_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
            "remat2": "jaxpr"}
# Primitives whose jaxpr parameter is only a combiner (lowered as an HLO ``to_apply``
# computation, like a reduction's), not a nested call: they may stay in a stream region.
_COMBINERS = ("scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max")


def _body(eqn):
    """The spliceable body of a call-like equation as ``(jaxpr, consts)``, or None."""
    key = _INLINED.get(eqn.primitive.name)
    body = eqn.params.get(key) if key else None
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return (body, ()) if isinstance(body, jex_core.Jaxpr) else None


def unflattenable(jaxpr) -> list[str]:
    """Primitives of ``jaxpr`` (call bodies included) that carry sub-computations which
    ``flatten_calls`` cannot splice: loops, conditionals and the like."""
    found = []
    for eqn in jaxpr.eqns:
        body = _body(eqn)
        if body is not None:
            found += unflattenable(body[0])
        elif (eqn.primitive.name not in _COMBINERS
              and next(iter(jex_core.jaxprs_in_params(eqn.params)), None) is not None):
            found.append(eqn.primitive.name)
    return found


def _eval_flat(jaxpr, consts, args):
    """Evaluate ``jaxpr`` by re-binding its equations, splicing in the bodies of call-like
    equations (``_INLINED``) recursively."""
    env = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        body = _body(eqn)
        if body is not None:
            outs = _eval_flat(*body, ins)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            if isinstance(params, tuple):  # older jax: (subfuns, params)
                subfuns, params = params
                ins = [*subfuns, *ins]
            outs = eqn.primitive.bind(*ins, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update((v, o) for v, o in zip(eqn.outvars, outs)
                   if not isinstance(v, jex_core.DropVar))
    return [read(v) for v in jaxpr.outvars]


def flatten_calls(fn, *args):
    """Trace ``fn(*args)`` and return ``(flat_fn, unflattened)``: ``flat_fn`` computes the
    same values with every nested jitted or call-like function spliced into one body, and
    ``unflattened`` lists the primitives with sub-computations that stay nested
    (``unflattenable``)."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    tree = jax.tree.structure(shapes)

    def flat_fn(*args):
        return jax.tree.unflatten(tree, _eval_flat(closed.jaxpr, closed.consts,
                                                   jax.tree.leaves(args)))

    return flat_fn, unflattenable(closed.jaxpr)


def _on_stream(fn, stream: int):
    """``fn`` flattened (``flatten_calls``) and annotated to run on CUDA stream ``stream``
    (jax 0.10: ``compute_on2``, jax 0.11+: ``compute_on`` as a function wrapper).

    A half that still holds a loop or conditional after flattening is not annotated (XLA
    cannot give the nested computation a stream): it runs on the main stream, with a warning
    naming the primitive. Values and gradients are the same either way.
    """
    from jax.experimental import compute_on as co

    wrap = getattr(co, "compute_on2", None) or co.compute_on

    def run(*args):
        flat_fn, nested = flatten_calls(fn, *args)
        if nested:
            warnings.warn(
                f"pareprop: a half of the layer step contains {sorted(set(nested))}, which "
                "XLA:GPU cannot place on a CUDA stream; that half runs on the main stream "
                "(same values and gradients, no stream overlap). F and G without loops or "
                "conditionals get the streams.", RuntimeWarning, stacklevel=2)
            return flat_fn(*args)
        return wrap(flat_fn, compute_type=f"gpu_stream:{stream}",
                    out_memory_spaces=jax.memory.Space.Device)(*args)

    return run


GRADS_STREAM, REBUILD_STREAM = 1, 2

# Whether pareprop puts its two halves on CUDA streams ``GRADS_STREAM``/``REBUILD_STREAM``
# on GPU (read when the step is traced; set ``revjax.core.GPU_STREAMS = True`` before
# ``jax.jit``). Off by default: compiled for an H200 on jax 0.10.2 and 0.11.2, XLA schedules
# the two stream regions one after the other in the loop body (no overlap; no flag or step
# shape tried changed that) while keeping both regions' buffers live, which raises the
# step's memory (docs/pareprop-gpu.md has the measurements). Off, the GPU program is the
# same dataflow on one stream.
GPU_STREAMS = False

# XLA:CPU compiler options for programs that use pareprop (``jax.jit(fn, compiler_options=
# CPU_COMPILER_OPTIONS)``, or the same as ``XLA_FLAGS``). pareprop carries one layer's VJP
# residuals and parameter slices from the step that rebuilds the layer to the step that
# differentiates it; XLA's default copy insertion copies every carried value at every step
# (the new ones are written while the old are still read), region analysis proves the
# copies unneeded and drops them (71 -> 0 per step for Rev-ViT-S).
# experiments/pareprop_cpu.py measures it.
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# XLA:GPU options for programs that use pareprop: none is needed (none found that makes the
# stream regions overlap, see ``GPU_STREAMS``); kept so user code can pass the per-platform
# choice of ``compiler_options`` unchanged when one is.
GPU_COMPILER_OPTIONS: dict = {}


def compiler_options(platform: str | None = None) -> dict:
    """The compiler options the library uses for pareprop programs on ``platform`` (default:
    ``jax.default_backend()``): ``CPU_COMPILER_OPTIONS`` on CPU, ``GPU_COMPILER_OPTIONS`` on
    CUDA, none elsewhere. Pass them as ``jax.jit(fn, compiler_options=...)``."""
    platform = platform or jax.default_backend()
    return dict({"cpu": CPU_COMPILER_OPTIONS, "cuda": GPU_COMPILER_OPTIONS,
                 "gpu": GPU_COMPILER_OPTIONS}.get(platform, {}))


# -------------------------------------------------------------------------- the stack


def _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer, anchor_every=None):
    """The stack's outputs ``(Y1, Y2)``; with ``anchor_every`` also the anchors: the stream
    pairs entering layers 0, k, 2k, ..., stacked (``ceil(depth / k)`` pairs)."""
    depth = jax.tree.leaves((params_f, params_g))[0].shape[0]
    anchors = None
    if anchor_every is not None:
        n = -(-depth // anchor_every)
        anchors = tuple(jnp.zeros((n, *x.shape), x.dtype) for x in (x1, x2))

    def step(carry, xs):
        x, anchors = carry
        i, pf, pg, pl = xs
        if anchors is not None:
            anchors = _keep_anchor(anchors, x, i, anchor_every)
        return (_layer(f, g, pf, pg, *x, shared, pl), anchors), None

    (y, anchors), _ = lax.scan(step, ((x1, x2), anchors),
                               (jnp.arange(depth), params_f, params_g, per_layer))
    return y if anchor_every is None else (y, anchors)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _reversible(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared, per_layer):
    return _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer)


def _reversible_fwd(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared, per_layer):
    if anchor_every is None:
        y, anchors = _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer), None
    else:
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
    anchor = lambda i: _anchor_at(anchors, i, anchor_every)
    layer = lambda i: (_at(params_f, i), _at(params_g, i), _at(per_layer, i))
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    grads0 = (zeros(params_f), zeros(params_g))

    def put(grads, i, dp):  # write layer i's parameter gradients into the stacked buffers
        return jax.tree.map(lambda a, d: lax.dynamic_update_index_in_dim(a, d, i, 0)
                            if _inexact(a) else a, grads, dp)

    if mode == "reprop":
        def step(carry, i):
            y, dy, grads = carry
            pf, pg, pl = layer(i)
            x, res, spec = _rebuild(f, g, pf, pg, *y, shared, pl, anchor(i))
            dx, dp = _grads(spec, res, pf, pg, shared, pl, *dy)
            return (x, dx, put(grads, i, dp)), None

        (_, dx, grads), _ = lax.scan(step, ((y1, y2), dy, grads0), jnp.arange(depth),
                                     reverse=True)
    else:  # pareprop
        # Prologue: rebuild the top layer, keeping its residuals.
        pf, pg, pl = p_top = layer(depth - 1)
        x_top, res_top, spec = _rebuild(f, g, pf, pg, y1, y2, shared, pl,
                                        anchor(depth - 1))

        def halves(i, x_i, p_i, res_i, dy_i):
            """(a) grads of layer i from its kept residuals and parameter slices; (b) rebuild
            of layer i-1 (restarting from its anchor, if it has one), whose parameter slices
            the next step's grads reuse (slicing the stacked parameters again would copy a
            layer's weights twice per step)."""
            pf_i, pg_i, pl_i = p_i

            def grads_half(res_i, dy_i):
                return _grads(spec, res_i, pf_i, pg_i, shared, pl_i, *dy_i)

            def rebuild_half(x_i):
                pf_p, pg_p, pl_p = p_p = layer(i - 1)
                x_p, res_p, spec_p = _rebuild(f, g, pf_p, pg_p, *x_i, shared, pl_p,
                                              anchor(i - 1))
                if [s[1] for s in spec_p] != [s[1] for s in spec]:
                    raise AssertionError("a layer's residual layout changed between steps")
                return x_p, p_p, res_p

            def on_gpu():
                return (_on_stream(grads_half, GRADS_STREAM)(res_i, dy_i),
                        _on_stream(rebuild_half, REBUILD_STREAM)(x_i))

            def elsewhere():
                return grads_half(res_i, dy_i), rebuild_half(x_i)

            if not GPU_STREAMS:  # one program for every platform: nothing to choose between
                return elsewhere()
            return lax.platform_dependent(cuda=on_gpu, default=elsewhere)

        def step(carry, i):
            x_i, p_i, res_i, dy_i, grads = carry
            (dx_i, dp_i), (x_p, p_p, res_p) = halves(i, x_i, p_i, res_i, dy_i)
            return (x_p, p_p, res_p, dx_i, put(grads, i, dp_i)), None

        carry = (x_top, p_top, res_top, dy, grads0)
        if depth > 1:  # steps i = depth-1 .. 1
            carry, _ = lax.scan(step, carry, jnp.arange(1, depth), reverse=True)
        # Epilogue: grads of layer 0 (its residuals and slices came from the last rebuild).
        _, (pf, pg, pl), res_0, dy_0, grads = carry
        dx, dp = _grads(spec, res_0, pf, pg, shared, pl, *dy_0)
        grads = put(grads, 0, dp)

    zero = lambda t: jax.tree.map(_zero_cotangent, t)
    grads = jax.tree.map(lambda p, d: d if _inexact(p) else _zero_cotangent(p),
                         (params_f, params_g), grads)
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
    _check(params_f, params_g, x1, x2, per_layer, mode)
    f, g, x1, x2 = _with_policy(f, g, x1, x2, _stream_dtype(stream_dtype))
    anchor_every = _anchor_every(anchor_every)
    shared = jax.tree.map(lax.stop_gradient, tuple(shared))
    per_layer = jax.tree.map(lax.stop_gradient, per_layer)
    if mode == "backprop":
        return _forward_scan(f, g, params_f, params_g, x1, x2, shared, per_layer)
    return _reversible(f, g, mode, anchor_every, params_f, params_g, x1, x2, shared,
                       per_layer)


def _with_policy(f, g, x1, x2, stream):
    """``(f, g, x1, x2)`` under the precision policy: the streams cast to ``stream`` and the
    halves computing in the inputs' dtype (``_in_compute``); unchanged when that is
    ``stream`` already or ``stream`` is None."""
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if stream is None or stream == x1.dtype:
        return f, g, x1, x2
    compute = x1.dtype
    return (_in_compute(f, compute, stream), _in_compute(g, compute, stream),
            x1.astype(stream), x2.astype(stream))


def invert(f: Fn, g: Fn, params_f: PyTree, params_g: PyTree, y1, y2, shared=(),
           per_layer=None) -> tuple[jax.Array, jax.Array]:
    """Rebuild the stack's inputs ``(X1, X2)`` from its outputs, layer by layer from the top."""
    per_layer = {} if per_layer is None else dict(per_layer)

    def step(y, xs):
        pf, pg, pl = xs
        x2 = y[1] - g(pg, y[0], *shared, **pl)
        return (y[0] - f(pf, x2, *shared, **pl), x2), None

    x, _ = lax.scan(step, (y1, y2), (params_f, params_g, per_layer), reverse=True)
    return x


# ------------------------------------------------------------------- rebuild check

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
    _check(params_f, params_g, x1, x2, per_layer, "reprop")
    f, g, x1, x2 = _with_policy(f, g, x1, x2, _stream_dtype(stream_dtype))
    every = _anchor_every(anchor_every)
    shared = tuple(shared)

    def forward(x, xs):
        pf, pg, pl = xs
        return _layer(f, g, pf, pg, *x, shared, pl), x

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
    _check_options(threshold, on_error)
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((x1, x2, params_f))):
        raise TypeError("check_rebuild compares values on the host: call it outside "
                        "jax.jit/grad (on concrete arrays); use rebuild_errors when tracing")
    errors = np.asarray(jax.jit(partial(
        rebuild_errors, f, g, stream_dtype=stream_dtype, anchor_every=anchor_every))(
        params_f, params_g, x1, x2, tuple(shared), per_layer))
    report_rebuild(errors, threshold, on_error, stacklevel=3)
    return errors


def _check_options(threshold, on_error):
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
