"""``RevStack``: a Flax NNX module around the functional core in ``core.py``."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from .core import MODES, reversible


def stacked(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs):
    """``depth`` independently initialised copies of ``make(rngs)``, stacked on axis 0."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(rngs)


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
    """

    def __init__(self, make_f: Callable[[nnx.Rngs], nnx.Module],
                 make_g: Callable[[nnx.Rngs], nnx.Module], *, depth: int, rngs: nnx.Rngs,
                 mode: str = "pareprop"):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.depth, self.mode = depth, mode
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
        return reversible(f, g, state_f, state_g, x1, x2, shared, per_layer,
                          mode=self.mode if mode is None else mode)


class ResidualStack(nnx.Module):
    """The standard (non-reversible) twin of ``RevStack``: ``x = x + F(x); x = x + G(x)`` per
    layer on one stream, with the same stacked F and G, run as one scan under plain autodiff.
    """

    def __init__(self, make_f, make_g, *, depth: int, rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.depth = depth
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

        x, _ = jax.lax.scan(step, x, (state_f, state_g, per_layer or {}))
        return x
