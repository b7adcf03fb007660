"""``RevStack``: a Flax NNX module around the functional core in ``core.py``."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable

import jax
import numpy as np
from flax import nnx

from .core import DEFAULT_MODE, MODES, reversible
from .numerics import anchor_every_of, stream_dtype_of
from .rebuild import (RebuildError, check_options, check_rebuild, rebuild_errors,
                      report_rebuild)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs):
    """``depth`` independently initialised copies of ``make(rngs)``, stacked on axis 0."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    layers = create(rngs)
    for _, var in nnx.iter_graph(layers):  # so that per-layer rules (weight decay) see axis 0
        if isinstance(var, nnx.Variable):
            _mark_stacked(var)
    return layers


STACKED = "stacked_layers"  # Variable metadata: the leading axis is a stack's depth axis


def _mark_stacked(var: nnx.Variable) -> None:
    if hasattr(var, "set_metadata"):
        var.set_metadata(**{STACKED: True})
    else:  # older flax: metadata are attributes
        setattr(var, STACKED, True)


def _is_stacked(var: nnx.Variable) -> bool:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return bool(meta.get(STACKED, getattr(var, STACKED, False)))


def layer_ndim(var) -> int:
    """The number of dimensions of one layer's slice of ``var`` (an ``nnx.Variable`` or an
    array): its ``ndim``, less the depth axis of a ``RevStack``/``ResidualStack``."""
    value = var.value if isinstance(var, nnx.Variable) else var
    return value.ndim - int(isinstance(var, nnx.Variable) and _is_stacked(var))


def _stateless_fn(module: nnx.Module, name: str):
    """A pure function ``fn((params, rest), x, *shared, **per_layer)`` calling one layer's
    slice of ``module``. Non-parameter state is a constant (gradient exactly zero); a call
    that writes to any state raises, since the backward would replay it differently."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def fn(state, x, *shared, **per_layer):
        params, rest = state
        layer = nnx.merge(graphdef, params, jax.lax.stop_gradient(rest))
        before = [id(v) for v in jax.tree.leaves(nnx.state(layer))]
        out = layer(x, *shared, **per_layer)
        after = [id(v) for v in jax.tree.leaves(nnx.state(layer))]
        if before != after:
            raise ValueError(
                f"{name} updated its state during a call (batch statistics, RNG counters, "
                "caches...); reversible layers must be pure functions of their inputs and "
                "parameters. Pass randomness in as per_layer keys instead.")
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"{name} must return its input's shape and dtype "
                             f"{x.dtype}{list(x.shape)}, got {out.dtype}{list(out.shape)}")
        return out

    return fn, (params, rest)


class RevStack(nnx.Module):
    """``depth`` reversible layers ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``.

    ``make_f(rngs)`` and ``make_g(rngs)`` build one layer's F and G; each is called as
    ``f(x, *shared, **per_layer_slice)`` and must return an array of x's shape and dtype.
    Parameters of all layers are stacked on a leading depth axis (one ``lax.scan`` serves
    any depth). ``mode`` (one of ``MODES``) picks the backward; it can be overridden per call.
    ``shared`` and ``per_layer`` inputs are not differentiated (``stop_gradient``).

    Numerics (as ``reversible``'s): ``stream_dtype`` (None, or e.g. ``"float32"``: the two
    streams and the inverse's subtractions in that dtype while F and G compute in the
    inputs' dtype; the outputs come back in it) and ``anchor_every`` (None, or k: store the
    exact stream pair every k layers and restart the backward's rebuild there).
    ``check_rebuild`` measures the rebuild's per-layer error.
    """

    def __init__(self, make_f: Callable[[nnx.Rngs], nnx.Module],
                 make_g: Callable[[nnx.Rngs], nnx.Module], *, depth: int, rngs: nnx.Rngs,
                 mode: str = DEFAULT_MODE, stream_dtype=None, anchor_every: int | None = None):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.depth, self.mode = depth, mode
        self.stream_dtype = stream_dtype_of(stream_dtype)
        self.anchor_every = anchor_every_of(anchor_every)
        self.f = stacked(make_f, depth, rngs)
        self.g = stacked(make_g, depth, rngs)
        for name, module in (("F", self.f), ("G", self.g)):
            mutable = nnx.state(module, nnx.Not(nnx.Param))
            bad = {type(v).__name__ for v in jax.tree.leaves(
                mutable, is_leaf=lambda v: isinstance(v, nnx.Variable))
                if isinstance(v, (nnx.BatchStat, nnx.RngState))}
            if bad:
                raise ValueError(
                    f"{name} holds state that changes during a call ({', '.join(sorted(bad))}); "
                    "reversible layers must be pure: no batch statistics or RNG streams "
                    "(pass dropout keys as per_layer inputs).")

    def __call__(self, x1: jax.Array, x2: jax.Array, *shared: jax.Array,
                 per_layer: dict | None = None, mode: str | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        f, state_f = _stateless_fn(self.f, "F")
        g, state_g = _stateless_fn(self.g, "G")
        if _CHECKS:  # inside ``check_rebuilds``
            _CHECKS[-1].check(self, x1, x2, shared, per_layer)
        return reversible(f, g, state_f, state_g, x1, x2, shared, per_layer,
                          mode=self.mode if mode is None else mode,
                          stream_dtype=self.stream_dtype, anchor_every=self.anchor_every)

    def check_rebuild(self, x1: jax.Array, x2: jax.Array, *shared: jax.Array,
                      per_layer: dict | None = None, threshold: float = 1e-2,
                      on_error: str = "raise"):
        """Per-layer relative errors of the inputs the backward rebuilds for this call
        (``revjax.rebuild.check_rebuild`` with this stack's ``stream_dtype`` and
        ``anchor_every``); raises ``RebuildError`` or warns past ``threshold``."""
        f, state_f = _stateless_fn(self.f, "F")
        g, state_g = _stateless_fn(self.g, "G")
        return check_rebuild(f, g, state_f, state_g, x1, x2, shared, per_layer,
                             threshold=threshold, on_error=on_error,
                             stream_dtype=self.stream_dtype, anchor_every=self.anchor_every)


_CHECKS: list = []  # the active ``check_rebuilds`` blocks


class _Checks:
    """One ``check_rebuilds`` block: its options and the per-call reports."""

    def __init__(self, threshold, on_error):
        check_options(threshold, on_error)
        self.threshold, self.on_error, self.reports, self.calls = threshold, on_error, [], 0

    def check(self, stack, x1, x2, shared, per_layer):
        n, self.calls = self.calls, self.calls + 1
        if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((x1, x2))):
            try:
                errors = stack.check_rebuild(x1, x2, *shared, per_layer=per_layer,
                                             threshold=np.inf)
            except RebuildError as e:  # only for a non-finite error; reported below
                errors = e.errors
            return self.report(n, stack.depth, errors)
        # traced (under jax.jit): the errors are computed in the program and reported
        # from it when it runs
        f, state_f = _stateless_fn(stack.f, "F")
        g, state_g = _stateless_fn(stack.g, "G")
        errors = rebuild_errors(f, g, state_f, state_g, x1, x2, shared, per_layer,
                                stream_dtype=stack.stream_dtype, anchor_every=stack.anchor_every)
        jax.debug.callback(partial(self.report, n, stack.depth), jax.lax.stop_gradient(errors))

    def report(self, n, depth, errors):
        errors = np.asarray(errors)
        self.reports.append({"call": n, "depth": depth, "errors": errors})
        report_rebuild(errors, self.threshold, self.on_error, f" (RevStack call {n})",
                       stacklevel=5)


@contextlib.contextmanager
def check_rebuilds(threshold: float = 1e-2, on_error: str = "raise"):
    """A check mode for whole models: inside the block, every ``RevStack`` call first checks
    its rebuild (``RevStack.check_rebuild``) and raises ``RebuildError`` or warns, naming the
    call (numbered in call order from 0) and the layer. Yields the list of reports, one dict
    per call: ``call``, ``depth``, ``errors`` (per layer). A call traced inside the block (a
    function jitted there) computes the errors in the program and reports them through
    ``jax.debug.callback`` each time it runs (a raise then surfaces as jax's runtime error
    carrying the message; the program keeps reporting to this block's list if reused after
    it); programs traced outside the block are not checked."""
    checks = _Checks(threshold, on_error)
    _CHECKS.append(checks)
    try:
        yield checks.reports
    finally:
        _CHECKS.remove(checks)


class ResidualStack(nnx.Module):
    """The standard (non-reversible) twin of ``RevStack``: ``x = x + F(x); x = x + G(x)`` per
    layer on one stream, with the same stacked F and G, run as one scan under plain autodiff.

    ``remat`` (a name in ``REMAT_POLICIES``, or None): rematerialise each layer in the
    backward with ``jax.checkpoint`` inside the scan, saving only what the policy names
    (``nothing_saveable``: the layer inputs; ``dots_with_no_batch_dims_saveable``: also the
    outputs of the weight matmuls). The usual alternative to a reversible model; set it on
    a built model with ``set_remat``.
    """

    def __init__(self, make_f, make_g, *, depth: int, rngs: nnx.Rngs,
                 remat: str | None = None):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.depth = depth
        self.remat = _check_remat(remat)
        self.f = stacked(make_f, depth, rngs)
        self.g = stacked(make_g, depth, rngs)

    def __call__(self, x: jax.Array, *shared: jax.Array, per_layer: dict | None = None
                 ) -> jax.Array:
        graph_f, state_f = nnx.split(self.f)
        graph_g, state_g = nnx.split(self.g)

        def step(x, xs):
            sf, sg, pl = xs
            x = x + nnx.merge(graph_f, sf)(x, *shared, **pl)
            return x + nnx.merge(graph_g, sg)(x, *shared, **pl), None

        if _check_remat(self.remat) is not None:
            policy = getattr(jax.checkpoint_policies, self.remat)
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(step, x, (state_f, state_g, per_layer or {}))
        return x


REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable")


def _check_remat(policy: str | None) -> str | None:
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be None or one of {REMAT_POLICIES}, got {policy!r}")
    return policy


def set_remat(model: nnx.Module, policy: str | None) -> nnx.Module:
    """Set per-layer rematerialisation (``ResidualStack``'s ``remat``) on every standard
    stack in ``model``, in place; returns ``model``. Raises for a model without one (the
    reversible models keep no per-layer activations already: use ``mode="reprop"``)."""
    _check_remat(policy)
    stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, ResidualStack)]
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} has no ResidualStack to rematerialise: remat is for the "
            "standard twins; a reversible model needs none (use mode='reprop' or 'pareprop')")
    for stack in stacks:
        stack.remat = policy
    return model
