"""Rev-MViT and MViTv2 in revjax: gradients per mode and fusion, memory over stage depth,
parameter counts, relative position indices, pooling attention against a direct reference,
the transition block, stages, dropout, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import layers, stages
from revjax.models import mvit

from ..helpers import rel_err
from . import common
from .common import batch, grad_fn, loss, random_params


@functools.cache
def abstract_model(name="rev-mvit-test", dtype=jnp.float32, **overrides):
    """Shared, never mutated."""
    return common.abstract_model(name, dtype, **overrides)


def model_and_params(name="rev-mvit-test", dtype=jnp.float32, seed=0, **overrides):
    """(model, graphdef, parameters), parameters drawn on the host (``random_params``)."""
    return common.model_and_params(abstract_model(name, dtype, **overrides), seed)


def module_and_params(make, seed=0, scale=0.05):
    """An abstract module built by ``make(rngs)``, with host-drawn parameters merged in."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    return nnx.merge(graphdef, random_params(state, seed, scale))


def zeroed(state, *parts):
    """``state`` with the leaves whose path contains any of ``parts`` set to zero."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if any(s in jax.tree_util.keystr(p) for s in parts)
        else v, state)


@functools.cache
def all_modes_grad_fn(graphdef):
    """(loss, gradients (parameters, images)) in every mode, compiled as one function."""

    def grads(params, x, y, key):
        return {m: jax.value_and_grad(functools.partial(loss, graphdef), argnums=(0, 1))(
            params, x, y, m, key) for m in revjax.MODES}

    return jax.jit(grads)


@functools.cache
def forward_fn(graphdef):
    """Logits; dropout and drop-path on when ``key`` is not None."""

    def forward(params, x, key):
        rngs = None if key is None else nnx.Rngs(dropout=key)
        return nnx.merge(graphdef, params)(x, rngs=rngs)

    return jax.jit(forward)


# --- gradient comparison --------------------------------------------------------------------


def _is_zero_gradient_leaf(key: str) -> bool:
    """LayerNorm biases after K pooling: adding a constant to every key shifts each softmax
    row by a constant, so their gradient is exactly zero and its computed value pure
    roundoff."""
    return "['norm_k']" in key and "['bias']" in key


def grad_errors(got, want):
    """(largest relative error ``max|a - b| / max|b|`` over the leaves whose gradient is not
    identically zero and the path of the worst, largest ``max|leaf|`` over the identically
    zero leaves of both trees relative to the largest ``max|leaf|`` of ``want``, the number of
    such leaves)."""
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    scale = max(float(np.abs(np.asarray(w, np.float64)).max()) for _, w in flat_want)
    worst, worst_key, zero, n_zero = 0.0, None, 0.0, 0
    for (path, a), (_, b) in zip(flat_got, flat_want):
        key = jax.tree_util.keystr(path)
        if _is_zero_gradient_leaf(key):
            n_zero += 1
            zero = max(zero, float(np.abs(np.asarray(a, np.float64)).max()) / scale,
                       float(np.abs(np.asarray(b, np.float64)).max()) / scale)
        elif (err := rel_err(a, b)) > worst or worst_key is None:
            worst, worst_key = err, key
    return worst, worst_key, zero, n_zero


def assert_grads_close(got, want, rtol, ztol):
    """Every leaf within ``rtol`` relative; the identically-zero ones (``norm_k.bias``) below
    ``ztol`` times the largest gradient entry, in both trees."""
    worst, key, zero, n_zero = grad_errors(got, want)
    assert worst <= rtol, (worst, key)
    assert zero <= ztol, zero
    return n_zero


def test_norm_k_bias_gradient_is_roundoff_and_the_helper_sees_it():
    """The exact-zero claim the comparison relies on, on a plain pooling attention, and the
    helper's use of it: a relative error on those leaves is meaningless, an absolute one is
    not."""
    with jax.enable_x64(True):
        attn = module_and_params(lambda r: mvit.PoolingAttention(
            8, 8, 2, 8, rngs=r, kv_stride=2, param_dtype=jnp.float64), scale=0.3)
        graphdef, params = nnx.split(attn)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8), jnp.float64)
        loss = lambda p: (nnx.merge(graphdef, p)(x) ** 2).sum()  # noqa: E731
        g = jax.jit(jax.grad(loss))(params)
        scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(g))
        assert np.abs(np.asarray(g["norm_k"]["bias"][...])).max() <= 1e-13 * scale
        assert np.abs(np.asarray(g["norm_q"]["bias"][...])).max() > 1e-3 * scale
        assert np.abs(np.asarray(g["norm_k"]["scale"][...])).max() > 1e-3 * scale
        # the helper: a perturbation of a zero leaf far below the scale passes, one of the
        # order of the scale fails; a relative perturbation elsewhere is caught
        bumped = jax.tree_util.tree_map_with_path(
            lambda p, v: v + (1e-14 * scale if _is_zero_gradient_leaf(
                jax.tree_util.keystr(p)) else 0), g)
        assert assert_grads_close(bumped, g, 0.0, 1e-12) == 1
        bumped = jax.tree_util.tree_map_with_path(
            lambda p, v: v + (1e-3 * scale if _is_zero_gradient_leaf(
                jax.tree_util.keystr(p)) else 0), g)
        with pytest.raises(AssertionError):
            assert_grads_close(bumped, g, 1e-9, 1e-12)
        worst, key, _, _ = grad_errors(jax.tree.map(lambda v: v * (1 + 1e-6), g), g)
        assert 0.9e-6 < worst < 1.1e-6


# --- gradients ------------------------------------------------------------------------------

# Reversible stack depths 1, 2 and 3 (MViTv2 counting: a later stage's first block is its
# transition, so depths (1, 4) are stacks of 1 and 3) and every fusion (the three-stage
# default is compared mode by mode, float64, in parity_tests). The depth-3 stack trains with
# dropout and drop-path,
# whose per-layer keys and linearly increasing rates (transitions included) the backward
# must replay inside its scan. Compilation dominates the time: a stack of depth 1 compiles
# the cheapest (no scan in pareprop), and dropout adds about half again.
GRAD_CASES = [
    dict(depths=(1, 2), fusion="avg"),
    dict(depths=(2, 2), fusion="add"),
    dict(depths=(1, 4), fusion="concat_mlp", drop_rate=0.1, drop_path_rate=0.3),
]  # concat (the default): the parity suite, three stages, every mode pair, float64 and float32


@pytest.mark.parametrize("case", GRAD_CASES,
                         ids=lambda c: f"{c.get('depths', 'test')}-{c['fusion']}")
def test_rev_mvit_gradients_match_backprop_float64(case):
    with jax.enable_x64(True):
        model, graphdef, params = model_and_params(dtype=jnp.float64, seed=1, **case)
        x, y = batch(model.config, dtype=jnp.float64)
        key = jax.random.key(7) if case.get("drop_rate") else None
        if key is not None:  # dropout keys and the linear drop-path rates reach every block
            rates = np.linspace(0, 0.3, 5)
            per_layer, transition = model.stage_inputs(1, nnx.Rngs(dropout=0))
            assert per_layer["key"].shape == (3,) and transition["key"].shape == ()
            np.testing.assert_allclose(per_layer["drop_path"], rates[2:], rtol=1e-6)
            np.testing.assert_allclose(transition["drop_path"], rates[1], rtol=1e-6)
            per_layer, transition = model.stage_inputs(0, nnx.Rngs(dropout=0))
            assert per_layer["key"].shape == (1,) and transition == {}
            np.testing.assert_allclose(per_layer["drop_path"], rates[:1], rtol=1e-6)
        out = all_modes_grad_fn(graphdef)(params, x, y, key)
        (loss, grads) = out["backprop"]
        for mode in ("reprop", "pareprop"):
            assert rel_err(out[mode][0], loss) <= 1e-12, mode
            assert assert_grads_close(out[mode][1], grads, 1e-9, 1e-12) > 0, mode
        if key is None:  # (drop-path may drop a whole branch for the batch)
            assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


# --- memory ---------------------------------------------------------------------------------


def _temp_bytes(mode, depths):
    model = abstract_model(depths=depths)  # shapes are enough to compile
    graphdef, params = nnx.split(model)
    x, y = batch(model.config, n=8)
    lowered = grad_fn(graphdef).lower(params, x, y, mode, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", revjax.MODES)
def test_memory_over_stage_depth(mode):
    """The reversible stack gets 4x deeper (3 -> 12 layers). One stage: transitions run under
    plain autodiff whatever the mode and do not change with the stacks' depth (and compile
    slowly). Batch 8: the activations dominate."""
    one, four = _temp_bytes(mode, (3,)), _temp_bytes(mode, (12,))
    if mode == "backprop":
        assert four > 2 * one, (one, four)
    else:
        assert four <= 1.1 * one, (one, four)


# --- parameter counts -----------------------------------------------------------------------

# timm's mvitv2_tiny / small / base (224 px, 1000 classes); the MViTv2 paper (Li et al., 2022)
# rounds them to 24M / 35M / 52M.
TIMM = {"t": 24_173_320, "s": 34_870_216, "b": 51_472_744}


def _attention_count(d_in, d, heads, size, q_stride, kv_stride, kernel):
    """Pooling attention from width d_in to d: qkv and proj with biases, three depthwise
    pooling convolutions (no bias) with LayerNorm(head dim) each (none for the identity
    kernel 1, stride 1), two relative position tables of 2 max(q side, kv side) - 1 rows."""
    hd = d // heads
    n = (d_in * 3 * d + 3 * d) + (d * d + d)
    for stride in (q_stride, kv_stride, kv_stride):
        if kernel > 1 or stride > 1:
            n += kernel * kernel * hd + 2 * hd
    rows = 2 * max(size // q_stride, size // kv_stride) - 1
    return n + 2 * rows * hd


def _mlp_count(d, ratio):
    """LayerNorm(d) + Linear(d, hidden) + Linear(hidden, d)."""
    hidden = int(d * ratio)
    return 2 * d + (d * hidden + hidden) + (hidden * d + d)


def expected_count(c: mvit.MViTConfig) -> int:
    """Independent count from the architecture: embedding, blocks, fusion, transitions (each
    with a shortcut projection from its input width), head."""
    n = c.patch_kernel ** 2 * c.in_chans * c.dim + c.dim
    side, kv, k = c.img_size // c.patch_size, c.kv_stride, c.pool_kernel
    for i, depth in enumerate(c.depths):
        d, h = c.dim * 2 ** i, c.heads * 2 ** i
        if i:
            prev = width = d // 2
            if c.reversible and c.fusion == "concat_mlp":
                n += (2 * prev * 2 * prev + 2 * prev) + (2 * prev * prev + prev)
            if c.reversible and c.fusion == "concat":
                width = 2 * prev
            kv = max(kv // 2, 1)
            n += 2 * width + _attention_count(width, d, h, side, 2, kv, k)  # norm1, attn
            n += width * d + d + _mlp_count(d, c.mlp_ratio)  # shortcut_proj, norm2 + mlp
            side, depth = side // 2, depth - 1
        n += depth * (2 * d + _attention_count(d, d, h, side, 1, kv, k)
                      + _mlp_count(d, c.mlp_ratio))
    width = c.dim * 2 ** (len(c.depths) - 1) * (2 if c.reversible else 1)
    return n + 2 * width + width * c.num_classes + c.num_classes


def concat_difference(c: mvit.MViTConfig) -> int:
    """Rev-MViT (concat fusion) minus its twin: each transition's norm1, qkv and
    shortcut_proj take 2 C_in inputs instead of C_in; the head's LayerNorm and classifier
    take 2 C_last."""
    dims = [c.dim * 2 ** i for i in range(len(c.depths))]
    diff = sum(2 * c_in + c_in * 3 * c_out + c_in * c_out
               for c_in, c_out in zip(dims, dims[1:]))
    return diff + 2 * dims[-1] + dims[-1] * c.num_classes


def param_count(name, **overrides):
    model = abstract_model(name, **overrides)
    return model.config, sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", ["t", "s", "b", "test"])
def test_parameter_counts(variant):
    config, twin = param_count(f"mvit-{variant}")
    assert twin == expected_count(config)
    if variant in TIMM:
        assert twin == TIMM[variant]
    config, rev = param_count(f"rev-mvit-{variant}")
    assert config.fusion == "concat"
    assert rev == twin + concat_difference(config) == expected_count(config), (rev, twin)


@pytest.mark.parametrize("fusion", stages.FUSIONS)
def test_parameter_counts_per_fusion(fusion):
    config, n = param_count("rev-mvit-test", fusion=fusion)
    assert n == expected_count(config)
    config, n = param_count("rev-mvit-test", fusion=fusion, pool_kernel=1, kv_stride=1,
                            depths=(1, 2))  # identity pooling in stage 1: no pool_* modules
    assert n == expected_count(config)


# --- relative positions ---------------------------------------------------------------------


@pytest.mark.parametrize("q, k", [(8, 8), (4, 4), (1, 1), (8, 2), (16, 4), (4, 8), (2, 8)])
def test_rel_pos_index(q, k):
    index = mvit.rel_pos_index(q, k)
    assert index.shape == (q, k) and np.issubdtype(index.dtype, np.integer)
    assert index.min() == 0 and index.max() <= 2 * max(q, k) - 2
    # brute force, the docstring's formula: y * max(k/q, 1) - u * max(q/k, 1)
    # + (k - 1) * max(q/k, 1), on integer ratios
    q_ratio, k_ratio = max(k // q, 1), max(q // k, 1)
    for y in range(q):
        for u in range(k):
            assert index[y, u] == y * q_ratio - u * k_ratio + (k - 1) * k_ratio, (y, u)
    if q == k:
        y, u = np.meshgrid(np.arange(q), np.arange(k), indexing="ij")
        assert (index == y - u + k - 1).all()
        assert index.max() == 2 * k - 2 and len(np.unique(index)) == 2 * k - 1
    with pytest.raises(ValueError):
        index[0, 0] = 1  # cached: read-only


def test_rel_pos_index_quarter_kv_measures_offsets_on_the_query_grid():
    """K pooled by 4 (stage 1): key u sits at query row 4u, so the index is the query-grid
    offset y - 4u shifted by 4 (k - 1), and the table's 2q - 1 rows are enough."""
    q, k = 16, 4
    index = mvit.rel_pos_index(q, k)
    for y in range(q):
        for u in range(k):
            assert index[y, u] == (y - 4 * u) + 4 * (k - 1)
    assert index.max() == q - 1 + 4 * (k - 1) <= 2 * q - 2


# --- pooling attention ----------------------------------------------------------------------


def _np(v):
    return np.asarray(v[...], np.float64)


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layers.LN_EPS) * _np(norm.scale) + _np(norm.bias)


def _depthwise_pool(t, kernel, stride):
    """(b, H, W, d) -> (b, H/s, W/s, d): a depthwise convolution of ``kernel`` (k, k, 1, d),
    stride s, zero padding k // 2, written as a sum over the kernel's taps."""
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    tp = np.pad(t, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    side = (t.shape[1] + 2 * pad - k) // stride + 1
    out = np.zeros((t.shape[0], side, side, t.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += tp[:, i:i + stride * side:stride, j:j + stride * side:stride] * kernel[i, j, 0]
    return out


def reference_pooling_attention(x, attn: mvit.PoolingAttention):
    """MViTv2's pooling attention, directly: per head, pooled and normalised Q, K, V;
    logits q.k / sqrt(d) over the full (qh qw, kh kw) matrix plus a relative position bias
    built position by position; softmax; residual pooling (+ Q); proj."""
    b, size, _, _ = x.shape
    n = attn.heads
    qkv = x @ _np(attn.qkv.kernel) + _np(attn.qkv.bias)
    dim_out = qkv.shape[-1] // 3
    d = dim_out // n
    rel_h, rel_w = _np(attn.rel_pos_h), _np(attn.rel_pos_w)
    heads = []
    for head in range(n):
        pooled = []
        for j, (pool, norm, stride) in enumerate(
                ((attn.pool_q, attn.norm_q, attn.q_stride),
                 (attn.pool_k, attn.norm_k, attn.kv_stride),
                 (attn.pool_v, attn.norm_v, attn.kv_stride))):
            t = qkv[..., j * dim_out + head * d:j * dim_out + (head + 1) * d]
            if pool is not None:
                t = _layer_norm(_depthwise_pool(t, _np(pool.kernel), stride), norm)
            pooled.append(t)
        q, k, v = pooled  # (b, side, side, d)
        qs, ks = q.shape[1], k.shape[1]
        # the offset on the finer grid: query row y is at y * (ks / qs) when K is finer,
        # key row u at u * (qs / ks) when Q is finer
        q_step, k_step = max(ks // qs, 1), max(qs // ks, 1)
        bias = np.zeros((b, qs * qs, ks * ks))
        for y in range(qs):
            for xx in range(qs):
                for u in range(ks):
                    for vv in range(ks):
                        row_h = y * q_step - u * k_step + (ks - 1) * k_step
                        row_w = xx * q_step - vv * k_step + (ks - 1) * k_step
                        bias[:, y * qs + xx, u * ks + vv] = (q[:, y, xx] @ rel_h[row_h]
                                                             + q[:, y, xx] @ rel_w[row_w])
        qf, kf, vf = (t.reshape(b, -1, d) for t in (q, k, v))
        logits = np.einsum("bid,bjd->bij", qf, kf) / np.sqrt(d) + bias
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out = np.einsum("bij,bjd->bid", p / p.sum(-1, keepdims=True), vf) + qf
        heads.append(out.reshape(b, qs, qs, d))
    out = np.concatenate(heads, axis=-1)
    return out @ _np(attn.proj.kernel) + _np(attn.proj.bias)


# (dim_in, dim_out, heads, size, q_stride, kv_stride, kernel): a transition's Q and K/V
# pooled by 2 with a width change; stride 1 everywhere (a late stage); stage 1's K/V pooled
# by 4; a finer key grid than the query grid; the identity pooling (kernel 1, stride 1).
ATTENTION_CASES = [(8, 16, 2, 8, 2, 2, 3), (8, 8, 2, 4, 1, 1, 3), (8, 8, 1, 8, 1, 4, 3),
                   (8, 16, 2, 8, 2, 1, 3), (8, 8, 2, 4, 1, 1, 1)]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_pooling_attention_against_a_direct_reference(case):
    dim_in, dim_out, heads, size, q_stride, kv_stride, kernel = case
    with jax.enable_x64(True):
        attn = module_and_params(lambda r: mvit.PoolingAttention(
            dim_in, dim_out, heads, size, rngs=r, q_stride=q_stride, kv_stride=kv_stride,
            kernel=kernel, param_dtype=jnp.float64), seed=3, scale=0.3)
        assert (attn.pool_q is None) == (kernel == 1 and q_stride == 1)
        assert (attn.pool_k is None) == (attn.norm_k is None) == (kernel == kv_stride == 1)
        rows = 2 * max(size // q_stride, size // kv_stride) - 1
        assert attn.rel_pos_h.shape == attn.rel_pos_w.shape == (rows, dim_out // heads)
        graphdef, params = nnx.split(attn)
        call = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
        x = jax.random.normal(jax.random.key(4), (2, size, size, dim_in), jnp.float64)
        out = call(params, x)
        side = size // q_stride
        assert out.shape == (2, side, side, dim_out) and out.dtype == jnp.float64
        assert rel_err(out, reference_pooling_attention(np.asarray(x), attn)) <= 1e-12
        # the relative position tables matter (the comparison above sees them)
        no_tables = zeroed(params, "['rel_pos_h']", "['rel_pos_w']")
        assert rel_err(call(no_tables, x), out) > 1e-3
        with pytest.raises(ValueError, match=f"built for a {size}x{size} map, got"):
            attn(x[:, :size // 2, :size // 2])


# --- transition block -----------------------------------------------------------------------


def _max_pool_3x3_2(t, fill=-np.inf):
    """3x3 max-pool, stride 2, padding 1 (padded with ``fill``), by its windows."""
    tp = np.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
    side = t.shape[1] // 2
    return np.stack([np.stack([tp[:, 2 * y:2 * y + 3, 2 * x:2 * x + 3].max(axis=(1, 2))
                               for x in range(side)], 1) for y in range(side)], 1)


@pytest.mark.parametrize("dim_in, dim_out", [(8, 16), (16, 16)])  # twin; Rev-MViT's concat
def test_transition_block_pools_by_2_with_a_max_pool_shortcut(dim_in, dim_out):
    with jax.enable_x64(True):
        block = module_and_params(lambda r: mvit.TransitionBlock(
            dim_in, dim_out, 2, 8, rngs=r, kv_stride=2, param_dtype=jnp.float64), seed=5,
            scale=0.3)
        assert block.attn.q_stride == 2 and block.attn.kv_stride == 2
        assert block.norm1.scale.shape == (dim_in,) and block.mlp.fc1.kernel.shape[0] == dim_out
        # always projected: with the concat fusion (2 C_in = C_out) it mixes the streams
        assert block.shortcut_proj.kernel.shape == (dim_in, dim_out)
        graphdef, params = nnx.split(block)
        call = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
        x = jax.random.normal(jax.random.key(6), (2, 8, 8, dim_in), jnp.float64)
        out = call(params, x)
        assert out.shape == (2, 4, 4, dim_out)
        # with both branches silenced (attn.proj and mlp.fc2 zero) only the shortcut is left:
        # the max-pool of shortcut_proj(norm1(x))
        skip = call(zeroed(params, "['attn']['proj']", "['mlp']['fc2']"), x)
        t = (_layer_norm(np.asarray(x), block.norm1) @ _np(block.shortcut_proj.kernel)
             + _np(block.shortcut_proj.bias))
        assert rel_err(skip, _max_pool_3x3_2(t)) <= 1e-13
        assert rel_err(_max_pool_3x3_2(t, fill=0.0), _max_pool_3x3_2(t)) > 0  # -inf padding
        # the whole block, from its parts: s + A(norm1(x)), then + mlp(norm2(.))
        attn_out = reference_pooling_attention(_layer_norm(np.asarray(x), block.norm1),
                                               block.attn)
        mid = _max_pool_3x3_2(t) + attn_out
        hidden = _layer_norm(mid, block.norm2) @ _np(block.mlp.fc1.kernel) + _np(
            block.mlp.fc1.bias)
        hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
        want = mid + hidden @ _np(block.mlp.fc2.kernel) + _np(block.mlp.fc2.bias)
        assert rel_err(out, want) <= 1e-12


# --- stages, geometry, schedule -------------------------------------------------------------


def test_layout_and_geometry():
    model = abstract_model()
    assert model.mode == "reprop" and model.norm.scale.shape == (128,)
    assert model.head.kernel.shape == (128, 10)
    assert [(g.resolution, g.dim, g.heads, g.kv_stride, g.in_resolution, g.in_dim)
            for g in model.geometry] == [(8, 16, 1, 4, 8, 16), (4, 32, 2, 2, 8, 16),
                                         (2, 64, 4, 1, 4, 32)]
    s0, s1, s2 = model.stages
    assert s0.transition is None and s0.fusion is None
    assert [s.blocks.depth for s in model.stages] == [2, 2, 1]
    assert all(isinstance(s.blocks, revjax.RevStack) for s in model.stages)
    for s, in_dim in ((s1, 16), (s2, 32)):
        assert isinstance(s.fusion, stages.TwoStreamFusion) and s.fusion.mode == "concat"
        assert isinstance(s.transition, mvit.TransitionBlock)
        assert s.transition.norm1.scale.shape == (2 * in_dim,)  # both streams side by side
        assert s.transition.attn.qkv.kernel.shape == (2 * in_dim, 3 * 2 * in_dim)
        assert s.transition.shortcut_proj.kernel.shape == (2 * in_dim, 2 * in_dim)
        assert s.transition.attn.q_stride == 2
    assert s1.transition.attn.kv_stride == s1.blocks.f.attn.kv_stride == 2
    assert s0.blocks.f.attn.kv_stride == 4 and s2.blocks.f.attn.kv_stride == 1
    assert s0.blocks.f.attn.rel_pos_h.shape == (2, 15, 16)  # 2 max(8, 2) - 1 rows, stacked
    assert s1.transition.attn.rel_pos_h.shape == (7, 16)  # 2 max(4, 4) - 1 rows
    paths = {".".join(map(str, p)) for p, _ in nnx.state(model, nnx.Param).flat_state()}
    assert {"patch_embed.proj.kernel", "stages.0.blocks.f.attn.pool_q.kernel",
            "stages.0.blocks.f.attn.norm_k.bias", "stages.0.blocks.g.mlp.fc1.kernel",
            "stages.1.transition.norm1.scale", "stages.1.transition.attn.rel_pos_w",
            "stages.2.transition.mlp.fc2.kernel", "norm.scale", "head.kernel"} <= paths
    assert model.patch_embed.proj.kernel.shape == (7, 7, 3, 16)
    mlp = abstract_model(fusion="concat_mlp")
    assert mlp.stages[1].fusion.fc1.kernel.shape == (32, 32)
    assert mlp.stages[1].transition.norm1.scale.shape == (16,)
    twin = abstract_model("mvit-test")
    assert twin.mode == "backprop" and twin.norm.scale.shape == (64,)
    assert [s.blocks.depth for s in twin.stages] == [2, 2, 1]
    assert all(isinstance(s.blocks, revjax.ResidualStack) and s.fusion is None
               for s in twin.stages)
    assert twin.stages[0].transition is None
    assert twin.stages[1].transition.shortcut_proj.kernel.shape == (16, 32)
    t = abstract_model("mvit-t")
    assert [(g.resolution, g.dim, g.heads, g.kv_stride) for g in t.geometry] == [
        (56, 96, 1, 4), (28, 192, 2, 2), (14, 384, 4, 1), (7, 768, 8, 1)]
    assert [s.blocks.depth for s in t.stages] == [1, 1, 4, 1]
    assert nnx.eval_shape(lambda: revjax.models.build(
        "rev-mvit-test", rngs=nnx.Rngs(0), depths=[1, 2])).config.depths == (1, 2)
    names = revjax.models.names()
    assert all(f"{p}mvit-{v}" in names for p in ("rev-", "") for v in mvit.VARIANTS)


def test_drop_path_schedule():
    c = mvit.MViTConfig("x", True, 8, (1, 2, 5, 2), drop_path_rate=0.2)
    rates = mvit.drop_path_rates(c)
    assert [len(r) for r in rates] == [1, 2, 5, 2]
    np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.2, 10), rtol=1e-6)
    assert [mvit.stack_depth(c, i) for i in range(4)] == [1, 1, 4, 1]
    model = abstract_model(drop_path_rate=0.3)  # no dropout: drop-path alone
    assert model.stage_inputs(1) == (None, {})
    per_layer, transition = model.stage_inputs(2, nnx.Rngs(dropout=0))
    np.testing.assert_allclose(per_layer["drop_path"], [0.3], rtol=1e-6)
    np.testing.assert_allclose(transition["drop_path"], 0.25, rtol=1e-6)
    assert abstract_model().stage_inputs(1, nnx.Rngs(dropout=0)) == (None, {})  # no rates


def test_standard_twin_has_one_stream_and_backprop_only():
    model, graphdef, params = model_and_params("mvit-test", depths=(1, 2))
    x, _ = batch(model.config)
    assert forward_fn(graphdef)(params, x, None).shape == (2, 10)
    with pytest.raises(ValueError, match="backprop' only"):
        jax.eval_shape(lambda p: nnx.merge(graphdef, p)(x, mode="reprop"), params)
    with pytest.raises(ValueError, match="backprop' only"):
        revjax.models.build("mvit-test", rngs=nnx.Rngs(0), mode="pareprop")


def test_dropout_changes_the_output_and_the_key_reproduces_it():
    model, graphdef, params = model_and_params(depths=(1, 2), drop_rate=0.1,
                                               drop_path_rate=0.2)
    x, _ = batch(model.config)
    forward = forward_fn(graphdef)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    plain, a, again, b = (forward(params, x, k) for k in (None, k1, k1, k2))
    assert rel_err(a, again) == 0
    assert rel_err(a, plain) > 1e-3 and rel_err(b, a) > 1e-3
    assert rel_err(forward(params, x, None), plain) == 0


# --- errors ---------------------------------------------------------------------------------


def test_errors():
    build = functools.partial(revjax.models.build, "rev-mvit-test", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"every later stage >= 2"):
        build(depths=(2, 1))
    with pytest.raises(ValueError, match=r"every later stage >= 2"):
        build(depths=(0, 2))
    with pytest.raises(ValueError, match="non-empty tuple of ints"):
        build(depths=())
    with pytest.raises(ValueError, match="non-empty tuple of ints"):
        build(depths=(2, 2.0))
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        build(img_size=30)
    with pytest.raises(ValueError, match=r"stage 1's 9x9 map cannot be pooled by 2"):
        build(img_size=36, kv_stride=1)  # a 9x9 map
    with pytest.raises(ValueError, match=r"stage 1's 6x6 map is not divisible by its K/V "
                                         r"pooling stride 4"):
        build(img_size=24)
    with pytest.raises(ValueError, match="dim 16 is not divisible by heads 3"):
        build(heads=3)
    with pytest.raises(ValueError, match="pool_kernel must be a positive odd int"):
        build(pool_kernel=2)
    with pytest.raises(ValueError, match="kv_stride must be positive"):
        build(kv_stride=0)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        build(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="does not give an? 8-wide map"):
        build(patch_kernel=6)
    with pytest.raises(ValueError, match="fusion must be one of"):
        build(fusion="max")
    with pytest.raises(TypeError, match="unknown override"):
        build(depth=3)
    with pytest.raises(ValueError, match="backprop' only"):
        revjax.models.build("mvit-test", rngs=nnx.Rngs(0), mode="reprop")
    with pytest.raises(KeyError, match="unknown model"):
        revjax.models.build("rev-mvit-xl", rngs=nnx.Rngs(0))
    _, graphdef, params = model_and_params()
    shape = lambda x, **kw: jax.eval_shape(  # noqa: E731  (traces, nothing runs)
        lambda p: nnx.merge(graphdef, p)(x, **kw), params)
    assert shape(jnp.ones((2, 32, 32, 3))).shape == (2, 10)
    for bad in ((2, 64, 64, 3), (2, 32, 32, 1), (2, 3, 32, 32), (32, 32, 3)):
        with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\) \(NHWC\)"):
            shape(jnp.ones(bad))
    with pytest.raises(TypeError, match="floating-point"):
        shape(jnp.ones((2, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        shape(jnp.ones((2, 32, 32, 3)), mode="fastest")


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_depthwise_conv_is_the_grouped_convolution(kernel, stride):
    """The strided-slice depthwise convolution the pooling uses equals XLA's grouped
    convolution (padding k // 2), values and gradients."""
    kx, kw = jax.random.split(jax.random.key(kernel * 10 + stride))
    x = jax.random.normal(kx, (2, 8, 8, 4))
    w = jax.random.normal(kw, (kernel, kernel, 1, 4))
    p = kernel // 2

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=4)

    def ours(x, w):
        return mvit.depthwise_conv(x, w, stride)

    np.testing.assert_allclose(ours(x, w), grouped(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(fn(x, w)))  # noqa: E731
    for a, b in zip(jax.grad(loss(ours), argnums=(0, 1))(x, w),
                    jax.grad(loss(grouped), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
