"""Numerics options of the core: the float32-stream precision policy, re-anchoring
and the rebuild check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import rebuild

from ..helpers import tree_rel_err
from .common import abstract_model, batch, model_and_params
from .test_core import f, g, make


def loss(pf, pg, x1, x2, mask, pl, mode, **options):
    y1, y2 = revjax.reversible(f, g, pf, pg, x1, x2, (mask,), pl, mode=mode, **options)
    return jnp.sum(jnp.sin(y1) * y2.astype(y1.dtype)) + jnp.sum(y1.astype(jnp.float32) ** 2) / 7


grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=6,
                  static_argnames=("stream_dtype", "anchor_every"))


# A badly conditioned F (large weights, large output): the inverse X1 = Y1 - F(X2) amplifies
# an error in the rebuilt X2 by F's Lipschitz constant, layer after layer.
def f_steep(p, x):
    return 4.0 * jnp.sin(x @ p["w"])


def g_plain(p, x):
    return jnp.tanh(x @ p["w"])


def steep(depth, dtype=jnp.float32, dim=16, scale=5.0, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    w = lambda k, s: (jax.random.normal(k, (depth, dim, dim)) * s / dim ** 0.5).astype(dtype)
    x = jax.random.normal(ks[2], (4, dim)).astype(dtype)
    return {"w": w(ks[0], scale)}, {"w": w(ks[1], 1.0)}, x


def steep_grads(pf, pg, x, mode, **options):
    def loss(pf, pg, x):
        y1, y2 = revjax.reversible(f_steep, g_plain, pf, pg, x, x, mode=mode, **options)
        return jnp.sum(jnp.sin(y1 + y2).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(pf, pg, x)


# --------------------------------------------------------------------- the policy

@pytest.mark.parametrize("depth", [1, 3, 6])
def test_policy_gradients_match_backprop_float64_streams(depth):
    """float32 halves on float64 streams: every mode's gradients equal backprop's (same
    policy) to float32 rounding (the parameters and their gradients are float32)."""
    with jax.enable_x64(True):
        pf, pg, x, mask, pl = make(depth, dtype=jnp.float32)
        want = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop", stream_dtype="float64")
        for mode in ("reprop", "pareprop"):
            got = grad_fn(pf, pg, x, x * 0.5, mask, pl, mode, stream_dtype="float64")
            assert tree_rel_err(got, want) <= 1e-5, mode
            assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(got))


@pytest.mark.parametrize("depth", [2, 7])
def test_policy_bf16_halves_float32_streams(depth):
    """bfloat16 halves: with float32 streams reprop/pareprop equal backprop (same policy) to
    the float32 tolerance; all-bfloat16 they drift by far more (the policy is what helps)."""
    pf, pg, x, mask, pl = make(depth, dtype=jnp.bfloat16)
    want = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop", stream_dtype="float32")
    plain = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop")
    for mode in ("reprop", "pareprop"):
        got = grad_fn(pf, pg, x, x * 0.5, mask, pl, mode, stream_dtype="float32")
        assert tree_rel_err(got, want) <= 1e-4, mode
        drift = tree_rel_err(grad_fn(pf, pg, x, x * 0.5, mask, pl, mode), plain)
        assert drift > 1e-3, (mode, drift)


def test_policy_keeps_the_streams_in_float32():
    seen = []

    def half(p, x):
        seen.append(x.dtype)
        out = jnp.tanh(x @ p["w"])
        assert out.dtype == jnp.bfloat16
        return out

    pf, pg, x = steep(3, jnp.bfloat16, scale=1.0)
    y1, y2 = revjax.reversible(half, half, pf, pg, x, x, mode="pareprop",
                               stream_dtype="float32")
    assert y1.dtype == y2.dtype == jnp.float32
    assert set(seen) == {jnp.dtype(jnp.bfloat16)}  # F and G compute in bfloat16
    # the values are float32 sums, not bfloat16 ones rounded up
    for y in (y1, y2):
        assert np.mean(np.asarray(y) != np.asarray(y.astype(jnp.bfloat16), np.float32)) > 0.5
    # the same stack written out: float32 additions of bfloat16 halves (to bfloat16 rounding:
    # XLA may keep a fused half's intermediates in float32)
    x1 = x2 = x.astype(jnp.float32)
    for i in range(3):
        x1 = x1 + half({"w": pf["w"][i]}, x2.astype(jnp.bfloat16)).astype(jnp.float32)
        x2 = x2 + half({"w": pg["w"][i]}, x1.astype(jnp.bfloat16)).astype(jnp.float32)
    assert tree_rel_err((y1, y2), (x1, x2)) <= 2e-2
    # the gradient of the bfloat16 inputs comes back in bfloat16
    dx = jax.grad(lambda x: revjax.reversible(half, half, pf, pg, x, x, mode="reprop",
                                              stream_dtype="float32")[0].sum())(x)
    assert dx.dtype == jnp.bfloat16
    # None, or the inputs' own dtype, changes nothing
    same = revjax.reversible(half, half, pf, pg, x, x, mode="reprop", stream_dtype="bfloat16")
    assert same[0].dtype == jnp.bfloat16


# ---------------------------------------------------------------------- anchors

@pytest.mark.parametrize("depth, ks", [(1, (1, 2)), (2, (1, 3)), (3, (2,)), (4, (3,)),
                                       (5, (2, 3)), (6, (4,)), (7, (2, 3, 8))])
def test_anchored_gradients_match_backprop(depth, ks):
    """float64, depths 1..7, k dividing the depth or not (k=2, 3 at depths 5, 7), k >= depth;
    backprop ignores anchors."""
    with jax.enable_x64(True):
        pf, pg, x, mask, pl = make(depth)
        want = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop")
        if depth == 3:
            ignored = grad_fn(pf, pg, x, x * 0.5, mask, pl, "backprop", anchor_every=2)
            assert tree_rel_err(ignored, want) == 0
        for k in ks:
            for mode in ("reprop", "pareprop"):
                got = grad_fn(pf, pg, x, x * 0.5, mask, pl, mode, anchor_every=k)
                assert tree_rel_err(got, want) <= 1e-9, (mode, k)


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_anchors_restart_the_rebuild(mode):
    """A badly conditioned float32 stack: the rebuild drifts, so reprop/pareprop's gradients
    are far from backprop's; anchors at every layer make them backprop's (the VJPs are taken
    at the exact inputs), anchors every 2 layers bring them closer. pareprop's one-step-ahead
    rebuild must pick up each anchor, or anchor_every=1 would not match."""
    pf, pg, x = steep(6)
    want = steep_grads(pf, pg, x, "backprop")
    err = {k: tree_rel_err(steep_grads(pf, pg, x, mode, anchor_every=k), want)
           for k in (None, 2, 1)}
    assert err[None] > 1e-4, err  # past the float32 tolerance
    assert err[1] <= 1e-6, err
    assert err[2] < err[None] / 10, err
    # the check sees the same: zero error at the anchored layers, drift in between
    e = rebuild.rebuild_errors(f_steep, g_plain, pf, pg, x, x, anchor_every=2)
    assert np.all(np.asarray(e)[::2] == 0) and np.all(np.asarray(e)[1::2] > 0)
    assert np.max(e) < np.max(rebuild.rebuild_errors(f_steep, g_plain, pf, pg, x, x)) / 10


def _temp_bytes(depth, mode, k):
    pf, pg, x, mask, pl = make(depth, dim=64, hidden=256, batch=8, tokens=64,
                               dtype=jnp.float32)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=6,
                 static_argnames="anchor_every")
    compiled = fn.lower(pf, pg, x, x, mask, pl, mode, anchor_every=k).compile()
    return compiled.memory_analysis().temp_size_in_bytes, 2 * x.size * x.dtype.itemsize


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_anchor_memory_is_one_stream_pair_per_anchor(mode):
    depth = 12
    base, pair = _temp_bytes(depth, mode, None)
    for k in (3, 6):
        n = -(-depth // k)
        got, _ = _temp_bytes(depth, mode, k)
        assert got - base <= 1.1 * n * pair + pair, (k, n, got - base, pair)
        assert got - base >= 0.5 * n * pair, (k, n, got - base, pair)  # they are stored


def test_option_errors():
    pf, pg, x = steep(2)
    run = lambda **kw: revjax.reversible(f_steep, g_plain, pf, pg, x, x, mode="reprop", **kw)
    with pytest.raises(ValueError, match="unknown stream_dtype 'float33'"):
        run(stream_dtype="float33")
    with pytest.raises(ValueError, match="floating dtype"):
        run(stream_dtype="int32")
    with pytest.raises(ValueError, match="at least 1"):
        run(anchor_every=0)
    with pytest.raises(TypeError, match="anchor_every must be None or an int"):
        run(anchor_every=2.0)
    with pytest.raises(ValueError, match="unknown stream_dtype"):
        revjax.RevStack(lambda r: nnx.Linear(2, 2, rngs=r), lambda r: nnx.Linear(2, 2, rngs=r),
                        depth=1, rngs=nnx.Rngs(0), stream_dtype="f33")


# ----------------------------------------------------------------- the rebuild check

def test_check_rebuild_passes_a_well_conditioned_stack():
    pf, pg, x, mask, pl = make(5, dtype=jnp.float32)
    errors = revjax.check_rebuild(f, g, pf, pg, x, x, (mask,), pl, threshold=1e-5)
    assert errors.shape == (5,) and 0 < errors.max() <= 1e-5


def test_check_rebuild_names_the_layer_that_drifts():
    """Huge-scale F in bfloat16: the rebuild is off by order one; the error names the first
    layer from the top over the threshold, and warn mode warns instead."""
    pf, pg, x = steep(6, jnp.bfloat16)
    errors = np.asarray(rebuild.rebuild_errors(f_steep, g_plain, pf, pg, x, x))
    first = max(i for i, e in enumerate(errors) if e > 0.05)
    with pytest.raises(revjax.RebuildError,
                       match=rf"layer {first} \(of 6.*relative error .* > threshold 0.05"):
        revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x, threshold=0.05)
    with pytest.warns(RuntimeWarning, match=f"layer {first} "):
        got = revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x, threshold=0.05,
                                   on_error="warn")
    np.testing.assert_array_equal(got, errors)
    # float32 streams keep it exact enough to pass
    ok = revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x, threshold=0.05,
                              stream_dtype="float32")
    assert ok.max() < errors.max() / 10


def test_check_rebuild_errors():
    pf, pg, x = steep(2)
    with pytest.raises(ValueError, match="on_error"):
        revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x, on_error="ignore")
    with pytest.raises(ValueError, match="threshold"):
        revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x, threshold=0)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda x: revjax.check_rebuild(f_steep, g_plain, pf, pg, x, x))(x)


def test_model_options_and_check_mode():
    """Rev-ViT with bfloat16 compute, float32 streams and anchors: gradients in every mode
    equal backprop's (same policy); ``check_rebuilds`` reports every stack call."""
    model = abstract_model("rev-vit-test", depth=4, dtype=jnp.bfloat16,
                           stream_dtype="float32", anchor_every=3)
    model, graphdef, params = model_and_params(model)
    assert model.blocks.stream_dtype == jnp.float32 and model.blocks.anchor_every == 3
    from .common import grad_fn as model_grad_fn
    x, y = batch(model.config)
    gfn = model_grad_fn(graphdef)
    want = gfn(params, x, y, "backprop", None)
    assert tree_rel_err(gfn(params, x, y, "reprop", None), want) <= 1e-4
    # pareprop's kept VJPs recompute GELU and LayerNorm from stored matmul outputs, which XLA
    # fuses differently: bfloat16 rounding of the recomputed values, far below bfloat16's
    # epsilon (7.8e-3)
    assert tree_rel_err(gfn(params, x, y, "pareprop", None), want) <= 1e-3
    with revjax.check_rebuilds(threshold=1e-3) as reports:
        model(x)
        # traced in the block: the same errors, reported from the running program
        jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
    assert [r["call"] for r in reports] == [0, 1] and reports[0]["errors"].shape == (4,)
    np.testing.assert_allclose(reports[1]["errors"], reports[0]["errors"], atol=1e-6)
    with revjax.check_rebuilds(threshold=1e-30) as reports, pytest.raises(
            revjax.RebuildError, match=r"\(RevStack call 0\).*layer"):
        abstract_and_eager = nnx.merge(graphdef, params)
        abstract_and_eager.blocks.stream_dtype = None  # all-bfloat16: a visible drift
        abstract_and_eager(x)
    with pytest.raises(ValueError, match="reversible"):
        abstract_model("vit-test", stream_dtype="float32")
