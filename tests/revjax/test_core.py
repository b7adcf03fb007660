"""The functional core ``revjax.reversible``: gradients, inverse, memory, GPU streams, errors."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

import revjax
import revjax.streams
from revjax.streams import GRADS_STREAM, REBUILD_STREAM

from ..helpers import rel_err, tree_rel_err

TOL = {jnp.float64: 1e-9, jnp.float32: 1e-4}


# A generic F/G pair using a shared input (a token mask) and per-layer inputs (a scale and a
# dropout key), so every argument path of the core is exercised.
def f(p, x, mask, *, scale, key):
    h = (x - x.mean(-1, keepdims=True)) * p["ln"]
    h = jnp.tanh(h @ p["w"] + p["b"]) * mask * scale
    keep = jax.random.bernoulli(key, 0.8, h.shape)  # dropout, replayed exactly in backward
    return jnp.where(keep, h / 0.8, 0.0).astype(x.dtype)


def g(p, x, mask, *, scale, key):
    del mask, key
    return jax.nn.gelu(x @ p["w1"], approximate=False) @ p["w2"] * (2.0 - scale)


def make(depth, dim=8, hidden=16, batch=2, tokens=5, dtype=jnp.float64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    n = lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.3).astype(dtype)
    pf = {"ln": 1.0 + n(ks[0], (depth, dim)), "w": n(ks[1], (depth, dim, dim)),
          "b": n(ks[2], (depth, dim))}
    pg = {"w1": n(ks[3], (depth, dim, hidden)), "w2": n(ks[4], (depth, hidden, dim))}
    x = n(ks[5], (batch, tokens, dim)) / 0.3
    mask = jnp.ones((tokens, 1), dtype).at[-1].set(0.0)
    per_layer = {"scale": jnp.linspace(0.5, 1.5, depth, dtype=dtype)[:, None],
                 "key": jax.random.split(jax.random.key(seed + 1), depth)}
    return pf, pg, x, mask, per_layer


def loss(pf, pg, x1, x2, mask, per_layer, mode):
    y1, y2 = revjax.reversible(f, g, pf, pg, x1, x2, (mask,), per_layer, mode=mode)
    return jnp.sum(jnp.sin(y1) * y2) + jnp.sum(y1 ** 2) / 7


grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7])
def test_gradients_match_backprop(depth, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        pf, pg, x, mask, pl = make(depth, dtype=dtype)
        want = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop")
        assert jnp.all(want[4] == 0), "shared inputs must get exactly zero gradient"
        for mode in ("reprop", "pareprop"):
            got = grad_fn(pf, pg, x, x * 0.5, mask, pl, mode)
            assert tree_rel_err(got, want) <= TOL[dtype], mode
            assert all(a.dtype == dtype for a in jax.tree.leaves(got))
            assert jnp.all(got[4] == 0)


def test_outputs_identical_across_modes_and_deterministic():
    with jax.enable_x64(True):
        pf, pg, x, mask, pl = make(3)
        fwd = jax.jit(partial(revjax.reversible, f, g), static_argnames="mode")
        outs = {m: fwd(pf, pg, x, x, (mask,), pl, mode=m) for m in revjax.MODES}
        for m in revjax.MODES:
            np.testing.assert_array_equal(outs[m][0], outs["backprop"][0])
        a = grad_fn(pf, pg, x, x, mask, pl, "pareprop")
        b = grad_fn(pf, pg, x, x, mask, pl, "pareprop")
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(u, v)
        # a different dropout key must change the gradient (the keys are really used)
        pl2 = dict(pl, key=jax.random.split(jax.random.key(99), 3))
        c = grad_fn(pf, pg, x, x, mask, pl2, "pareprop")
        assert tree_rel_err(c, a) > 1e-3


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_inverse_rebuilds_inputs(depth):
    with jax.enable_x64(True):
        pf, pg, x, mask, pl = make(depth)
        y = revjax.reversible(f, g, pf, pg, x, 2 * x, (mask,), pl, mode="reprop")
        x1, x2 = revjax.invert(f, g, pf, pg, *y, (mask,), pl)
        assert rel_err(x1, x) <= 1e-12 and rel_err(x2, 2 * x) <= 1e-12


def _temp_bytes(depth, mode):
    pf, pg, x, mask, pl = make(depth, dim=64, hidden=256, batch=8, tokens=64,
                               dtype=jnp.float32)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=6)
    compiled = fn.lower(pf, pg, x, x, mask, pl, mode).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_memory_flat_in_depth(mode):
    # depth 3 vs 12 (4x); a scan of length 1 or 2 is laid out differently by XLA
    one, four = _temp_bytes(3, mode), _temp_bytes(12, mode)
    assert four <= 1.1 * one, (one, four)


def test_backprop_memory_grows_with_depth():
    one, four = _temp_bytes(3, "backprop"), _temp_bytes(12, "backprop")
    assert four > 2 * one, (one, four)


def test_cpu_compiler_options_drop_the_carried_residual_copies():
    """``CPU_COMPILER_OPTIONS`` (region-analysis copy insertion) removes the copies XLA:CPU
    makes of pareprop's carried residuals at every step, and computes the same gradients (to
    the float32 tolerance: the two programs may fuse, and so round, differently)."""
    pf, pg, x, mask, pl = make(4, dtype=jnp.float32)
    fn = jax.grad(loss, argnums=(0, 1, 2))
    args = (pf, pg, x, x, mask, pl, "pareprop")
    plain = jax.jit(fn, static_argnums=6).lower(*args).compile()
    tuned = jax.jit(fn, static_argnums=6,
                    compiler_options=revjax.CPU_COMPILER_OPTIONS).lower(*args).compile()
    copies = lambda c: len(re.findall(r" copy\(", c.as_text()))  # noqa: E731
    assert copies(tuned) <= 0.7 * copies(plain), (copies(tuned), copies(plain))
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(tuned) <= temp(plain), (temp(tuned), temp(plain))
    assert tree_rel_err(tuned(*args[:6]), plain(*args[:6])) <= TOL[jnp.float32]


def test_pareprop_slices_each_layers_weights_once_like_reprop():
    """PaReprop's step rebuilds layer i-1 and differentiates layer i: the slices of layer
    i-1's weights made for the rebuild are carried to the next step's grads, not sliced out
    of the stacked parameters again (a copy of a layer's weights per step). Whole program:
    one slice per weight in the forward scan and one in the backward loop, as for reprop."""
    pf, pg, x, mask, pl = make(4, dim=8, hidden=12, dtype=jnp.float32)

    def weight_slices(mode):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=6).lower(
            pf, pg, x, x, mask, pl, mode).compile().as_text()
        shapes = re.findall(r"= (f32\[[\d,]*\])\S* dynamic-slice\(", hlo)
        return {s: shapes.count(s) for s in ("f32[1,8,12]", "f32[1,12,8]")}

    reprop, pareprop = weight_slices("reprop"), weight_slices("pareprop")
    assert min(reprop.values()) >= 2, reprop
    assert pareprop == reprop, (pareprop, reprop)


# ----------------------------------------------------------------------- GPU streams

def _region(text, start):
    """Text of the brace-delimited region that opens at or after ``start``."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    raise ValueError("unbalanced module text")


def _reachable_text(module, region):
    """``region`` plus the bodies of all functions it calls, transitively."""
    bodies = {m.group(1): _region(module, m.end())
              for m in re.finditer(r"func\.func (?:public |private )?@([\w.$-]+)\(", module)}
    seen, todo, out = set(), [region], []
    while todo:
        text = todo.pop()
        out.append(text)
        for name in re.findall(r"call @([\w.$-]+)\(", text):
            if name not in seen and name in bodies:
                seen.add(name)
                todo.append(bodies[name])
    return "\n".join(out)


@pytest.mark.parametrize("depth", [1, 3])
def test_cuda_export_puts_both_halves_on_streams_inside_the_loop(depth, monkeypatch):
    pf, pg, x, mask, pl = make(depth, dtype=jnp.float32)
    gfn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=6)
    # by default (revjax.streams.GPU_STREAMS off) the cuda program carries no annotation
    default = export.export(gfn, platforms=["cuda"])(pf, pg, x, x, mask, pl, "pareprop")
    assert "_xla_stream_annotation" not in default.mlir_module()
    monkeypatch.setattr(revjax.streams, "GPU_STREAMS", True)
    gfn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=6)  # traced anew
    cuda = export.export(gfn, platforms=["cuda"])(pf, pg, x, x, mask, pl, "pareprop")
    module = cuda.mlir_module()
    annotated = r'call @\w+\([^\n]*_xla_stream_annotation = "{}"'
    loops = [m.end() for m in re.finditer(r"stablehlo\.while", module)]
    # the backward loop is the one whose body reaches both annotated halves
    bodies = [_reachable_text(module, _region(module, module.index(" do ", e))) for e in loops]
    both = [b for b in bodies
            if re.search(annotated.format(GRADS_STREAM), b)
            and re.search(annotated.format(REBUILD_STREAM), b)]
    assert len(both) == 1, "one loop must carry both stream annotations"
    # on CPU the same function carries no annotation: the default branch is plain dataflow
    cpu = export.export(gfn, platforms=["cpu"])(pf, pg, x, x, mask, pl, "pareprop")
    assert "_xla_stream_annotation" not in cpu.mlir_module()
    # reprop never asks for streams
    rep = export.export(gfn, platforms=["cuda"])(pf, pg, x, x, mask, pl, "reprop")
    assert "_xla_stream_annotation" not in rep.mlir_module()


# --------------------------------------------------------------------------- errors

def _call(pf, pg, x1, x2, pl=None, mode="reprop"):
    return revjax.reversible(f, g, pf, pg, x1, x2, (jnp.ones((5, 1)),), pl, mode=mode)


def test_errors():
    pf, pg, x, mask, pl = make(2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        _call(pf, pg, x, x, pl, mode="fast")
    with pytest.raises(ValueError, match="shape and dtype"):
        _call(pf, pg, x, x[:, :4], pl)
    with pytest.raises(ValueError, match="shape and dtype"):
        _call(pf, pg, x, x.astype(jnp.bfloat16), pl)
    empty = jax.tree.map(lambda a: a[:0], (pf, pg, pl))
    with pytest.raises(ValueError, match="depth must be at least 1"):
        _call(empty[0], empty[1], x, x, empty[2])
    with pytest.raises(ValueError, match="one leading depth axis"):
        _call(pf, jax.tree.map(lambda a: a[:1], pg), x, x, pl)
    with pytest.raises(ValueError, match="one leading depth axis"):
        _call(pf, pg, x, x, dict(pl, scale=pl["scale"][:1]))


# ------------------------------------------------------------------------ hypothesis

@settings(max_examples=4, deadline=None)
@given(depth=st.integers(1, 4), dim=st.sampled_from([2, 4, 6]),
       tokens=st.integers(1, 4), batch=st.integers(1, 3), seed=st.integers(0, 1000))
def test_random_shapes_and_depths(depth, dim, tokens, batch, seed):
    with jax.enable_x64(True):
        pf, pg, x, mask, pl = make(depth, dim=dim, hidden=2 * dim, batch=batch,
                                   tokens=tokens, seed=seed)
        gfn = jax.grad(loss, argnums=(0, 1, 2, 3))
        want = gfn(pf, pg, x, -x, mask, pl, "backprop")
        for mode in ("reprop", "pareprop"):
            assert tree_rel_err(gfn(pf, pg, x, -x, mask, pl, mode), want) <= 1e-9
