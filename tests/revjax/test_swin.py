"""Rev-Swin and Swin in revjax: gradients per mode and fusion, memory over stage depth,
parameter counts, window attention and the shifted-window mask, stages and fusion, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import layers, stages
from revjax.models import swin

from ..helpers import rel_err, tree_rel_err
from . import common
from .common import batch, grad_fn, loss


def abstract_model(name="rev-swin-test", dtype=jnp.float32, **overrides):
    return common.abstract_model(name, dtype, **overrides)


def model_and_params(name="rev-swin-test", dtype=jnp.float32, seed=0, **overrides):
    """(model, graphdef, parameters), parameters drawn on the host (``random_params``;
    the initialisation is checked once, in ``test_initialisation``)."""
    return common.model_and_params(abstract_model(name, dtype, **overrides), seed)


@functools.cache
def concrete_model():
    """One eagerly built (initialised) rev-swin-test, shared by the tests that need one."""
    return revjax.models.build("rev-swin-test", rngs=nnx.Rngs(0))


@functools.cache
def all_modes_grad_fn(graphdef):
    """Gradients (parameters, images) in every mode, compiled as one function."""

    def grads(params, x, y, key):
        return {m: jax.grad(functools.partial(loss, graphdef), argnums=(0, 1))(
            params, x, y, m, key) for m in revjax.MODES}

    return jax.jit(grads)


# --- gradients ------------------------------------------------------------------------------

# Stage depths 1, 2 and 3 (odd depths end on an unshifted layer), every fusion; img 16 gives a
# last stage that fits in one window (no shift); the last case trains with dropout and
# drop-path, whose per-layer keys and linearly increasing rates the backward must replay.
GRAD_CASES = [
    dict(depths=(1, 1), fusion="avg"),
    dict(depths=(2, 2), fusion="add", img_size=16),
    dict(depths=(3, 1), fusion="concat"),
    dict(depths=(2, 3), fusion="concat_mlp", drop_rate=0.1, drop_path_rate=0.3),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c['depths']}-{c['fusion']}")
def test_rev_swin_gradients_match_backprop_float64(case):
    with jax.enable_x64(True):
        model, graphdef, params = model_and_params(dtype=jnp.float64, seed=1, **case)
        x, y = batch(model.config, dtype=jnp.float64)
        key = jax.random.key(7) if case.get("drop_rate") else None
        if key is not None:  # dropout keys and the linear drop-path rates reach the stack
            pl = model.per_layer(1, nnx.Rngs(dropout=0))
            assert pl["key"].shape == (3,) and pl["drop_path"].shape == (3,)
            np.testing.assert_allclose(pl["drop_path"], [0.15, 0.225, 0.3], rtol=1e-6)
        grads = all_modes_grad_fn(graphdef)(params, x, y, key)
        for mode in ("reprop", "pareprop"):
            assert tree_rel_err(grads[mode], grads["backprop"]) <= 1e-9, mode
        if key is None:  # (drop-path may drop a whole branch for the batch)
            assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["backprop"]))


# --- memory ---------------------------------------------------------------------------------


def _temp_bytes(mode, depths):
    model = abstract_model(depths=depths)  # shapes are enough to compile
    graphdef, params = nnx.split(model)
    x, y = batch(model.config, n=8)
    lowered = grad_fn(graphdef).lower(params, x, y, mode, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", revjax.MODES)
def test_memory_over_stage_depth(mode):
    """Only the reversible stages get deeper (patch merging and fusion stay as they are)."""
    one, four = _temp_bytes(mode, (2, 2)), _temp_bytes(mode, (8, 8))
    if mode == "backprop":
        assert four > 2 * one, (one, four)
    else:
        assert four <= 1.1 * one, (one, four)


# --- parameter counts -----------------------------------------------------------------------

# Published counts of the standard Swins at 224 px, 1000 classes (Liu et al., 2021), millions.
PUBLISHED = {"t": 28.3, "s": 49.6, "b": 87.8, "l": 197.0}
# Ours; the same in revtorch (tests/revtorch/test_swin.py).
KNOWN = {"rev-swin-t": 30_221_122, "swin-t": 28_288_354, "rev-swin-s": 51_539_026,
         "swin-s": 49_606_258, "rev-swin-b": 90_861_344, "swin-b": 87_768_224,
         "rev-swin-l": 202_720_444, "swin-l": 196_532_476, "rev-swin-test": 24_238,
         "swin-test": 22_270}


def expected_count(c: swin.SwinConfig) -> int:
    """Independent count from the architecture: embedding, blocks, fusion, merging, head."""
    n = c.in_chans * c.patch_size ** 2 * c.dim + c.dim + 2 * c.dim  # conv + LayerNorm
    side = c.img_size // c.patch_size
    for i, (depth, heads) in enumerate(zip(c.depths, c.heads)):
        d, res = c.dim * 2 ** i, side // 2 ** i
        m, hidden = min(c.window_size, res), int(c.dim * 2 ** i * c.mlp_ratio)
        attn = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * m - 1) ** 2 * heads
        mlp = 2 * d + (d * hidden + hidden) + (hidden * d + d)
        n += depth * (attn + mlp)
        if i:
            prev = width = d // 2
            if c.reversible and c.fusion == "concat_mlp":
                n += (2 * prev * 2 * prev + 2 * prev) + (2 * prev * prev + prev)
            if c.reversible and c.fusion == "concat":
                width = 2 * prev
            n += 2 * 4 * width + 4 * width * d  # LayerNorm(4w), reduction without bias
    width = c.dim * 2 ** (len(c.depths) - 1) * (2 if c.reversible else 1)
    return n + 2 * width + width * c.num_classes + c.num_classes


def param_count(name, **overrides):
    model = abstract_model(name, **overrides)
    return model.config, sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", list(swin.VARIANTS))
def test_parameter_counts(variant):
    for name in (f"rev-swin-{variant}", f"swin-{variant}"):
        config, n = param_count(name)
        assert n == expected_count(config) == KNOWN[name], name
    if variant in PUBLISHED:
        assert abs(KNOWN[f"swin-{variant}"] / 1e6 - PUBLISHED[variant]) < 0.5


@pytest.mark.parametrize("fusion", stages.FUSIONS)
def test_parameter_counts_per_fusion(fusion):
    config, n = param_count("rev-swin-test", fusion=fusion, depths=(1, 3))
    assert n == expected_count(config)


# --- window attention and the shifted-window mask -------------------------------------------


def reference_attention(x, attn: swin.WindowAttention, bias_fn):
    """softmax(Q K^T / sqrt(d) + B) V for one window, B[h, i, j] = bias_fn(h, i, j)."""
    b, n, c = x.shape
    heads, d = attn.heads, c // attn.heads
    qkv = x @ np.asarray(attn.qkv.kernel[...]) + np.asarray(attn.qkv.bias[...])
    q, k, v = (qkv[..., j * c:(j + 1) * c].reshape(b, n, heads, d) for j in range(3))
    bias = np.array([[[bias_fn(h, i, j) for j in range(n)] for i in range(n)]
                     for h in range(heads)])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v).reshape(b, n, c)
    return out @ np.asarray(attn.proj.kernel[...]) + np.asarray(attn.proj.bias[...])


def test_one_unshifted_window_is_plain_attention_with_relative_bias():
    with jax.enable_x64(True):
        m, dim, heads = 3, 8, 2
        attn = swin.WindowAttention(dim, heads, m, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, m * m, dim), jnp.float64)
        # with a zero table it is the shared Attention module with the same weights
        plain = layers.Attention(dim, heads, rngs=nnx.Rngs(2), param_dtype=jnp.float64)
        plain.qkv, plain.proj = attn.qkv, attn.proj
        table = np.asarray(attn.relative_position_bias_table[...])
        attn.relative_position_bias_table[...] = jnp.zeros_like(table)
        assert rel_err(attn(x), plain(x)) <= 1e-13
        # with a table, B[h, i, j] is the table's row for the offset of tokens i and j
        attn.relative_position_bias_table[...] = jnp.asarray(table)

        def bias(h, i, j):
            (yi, xi), (yj, xj) = divmod(i, m), divmod(j, m)
            return table[(yi - yj + m - 1) * (2 * m - 1) + (xi - xj + m - 1), h]

        assert rel_err(attn(x), reference_attention(np.asarray(x), attn, bias)) <= 1e-13
        # the half on an m x m map (one window, shift 0) is LayerNorm + that attention
        half = swin.WindowAttentionHalf(dim, heads, m, rngs=nnx.Rngs(3),
                                        param_dtype=jnp.float64)
        half.attn = attn
        grid = x.reshape(2, m, m, dim)
        want = attn(half.norm(grid).reshape(2, m * m, dim)).reshape(grid.shape)
        assert rel_err(half(grid, shift=0, mask=jnp.zeros((1, m * m, m * m))), want) <= 1e-13


def test_relative_position_index():
    m = 4
    index = swin.relative_position_index(m)
    assert index.shape == (16, 16) and index.min() == 0 and index.max() == (2 * m - 1) ** 2 - 1
    assert (np.diag(index) == (m - 1) * (2 * m - 1) + m - 1).all()  # offset (0, 0)
    assert len(np.unique(index)) == (2 * m - 1) ** 2
    assert index[0, 15] == 0 and index[15, 0] == (2 * m - 1) ** 2 - 1  # (-3, -3) and (3, 3)


@pytest.mark.parametrize("res, m", [(8, 4), (16, 4), (14, 7)])
def test_shift_mask_allows_exactly_the_unwrapped_neighbours(res, m):
    """Tokens i, j of one rolled window may attend iff their original positions are within
    M - 1 of each other in both axes (no wrap between them); checked from the coordinates."""
    s = m // 2
    mask = swin.shift_mask(res, m, s)
    rolled = np.arange(res * res).reshape(1, res, res, 1)  # rolled position -> its index
    windows = swin.window_partition(rolled, m)[..., 0]  # (nW, N) rolled flat positions
    py, px = np.divmod(windows, res)
    oy, ox = (py + s) % res, (px + s) % res  # original coordinates
    near = ((np.abs(oy[:, :, None] - oy[:, None, :]) < m)
            & (np.abs(ox[:, :, None] - ox[:, None, :]) < m))
    assert mask.shape == ((res // m) ** 2, m * m, m * m)
    assert ((mask == 0) == near).all() and (mask[~near] == swin.MASK_VALUE).all()
    assert (swin.shift_mask(res, m, 0) == 0).all()
    assert not near.all()  # some pairs are really cut


def test_shifted_layer_does_not_attend_across_the_wrapped_border():
    with jax.enable_x64(True):
        res, m, dim = 8, 4, 8
        half = swin.WindowAttentionHalf(dim, 2, m, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (1, res, res, dim), jnp.float64)
        # perturb token (0, 1) (not by a constant: LayerNorm would remove it); the roll takes
        # the top rows to the bottom windows, next to rows 6 and 7
        y = x.at[0, 0, 1].add(jax.random.normal(jax.random.key(2), (dim,), jnp.float64))
        mask = jnp.asarray(swin.shift_mask(res, m, m // 2))
        out, out_y = half(x, shift=2, mask=mask), half(y, shift=2, mask=mask)
        changed = np.abs(np.asarray(out_y - out)).max(-1)[0] > 0
        # row 7 shares the rolled window with row 0 but is not its neighbour: unchanged;
        # row 1 (its neighbour, same window) changes; so does the token itself
        assert not changed[7, 1] and not changed[6, 0] and changed[1, 1] and changed[0, 1]
        assert changed.sum() == 4  # its wrapped corner of the window: rows 0-1 x columns 0-1
        unmasked = half(y, shift=2) - half(x, shift=2)
        assert np.abs(np.asarray(unmasked[0, 7, 1])).max() > 0  # the mask is what cuts it


def test_per_layer_shifts_and_masks():
    model = abstract_model(depths=(3, 2))
    assert [(g.resolution, g.window, g.shift) for g in model.geometry] == [(16, 4, 2),
                                                                           (8, 4, 2)]
    shifts, masks = swin.stage_inputs(model.geometry[0], 3)
    assert shifts.tolist() == [0, 2, 0] and masks.shape == (3, 16, 16, 16)
    assert (masks[0] == 0).all() and (masks[2] == 0).all() and (masks[1] < 0).any()
    t = abstract_model("swin-t")
    assert [(g.resolution, g.dim, g.window, g.shift) for g in t.geometry] == [
        (56, 96, 7, 3), (28, 192, 7, 3), (14, 384, 7, 3), (7, 768, 7, 0)]
    rates = swin.drop_path_rates(swin.SwinConfig("x", True, 8, (2, 2, 6, 2), (1, 1, 1, 1),
                                                 drop_path_rate=0.2))
    np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.2, 12), rtol=1e-6)


def test_patch_merging_takes_2x2_neighbourhoods_in_swin_order():
    merge = swin.PatchMerging(3, 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
    # Swin's order, written with strided slices: offsets (0,0), (1,0), (0,1), (1,1) in (y, x)
    cat = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                           x[:, 1::2, 1::2]], axis=-1)
    assert merge(x).shape == (2, 2, 3, 6)
    assert rel_err(merge(x), merge.reduction(merge.norm(cat))) <= 1e-6
    assert merge.reduction.bias is None and merge.norm.scale.shape == (12,)


def test_branch_dropout_with_per_layer_rates():
    x = jnp.ones((1000, 3))
    key = jax.random.key(0)
    assert layers.branch_dropout(x, 0.0, 0.5, None, 0) is x
    assert (layers.branch_dropout(x, 0.0, jnp.float32(0.0), key, 0) == x).all()
    out = jax.jit(lambda r: layers.branch_dropout(x, 0.0, r, key, 1))(jnp.float32(0.5))
    assert set(np.unique(out).tolist()) == {0.0, 2.0} and 0.4 < (out[:, 0] == 0).mean() < 0.6
    assert ((out == 0).all(1) | (out == 2).all(1)).all()  # whole samples


# --- stages and fusion ----------------------------------------------------------------------


def test_two_stream_fusion():
    x1, x2 = jnp.full((2, 3, 4), 1.0), jnp.full((2, 3, 4), 3.0)
    want = {"avg": (4, 2.0), "add": (4, 4.0), "concat": (8, None)}
    for mode, (width, value) in want.items():
        fuse = stages.TwoStreamFusion(mode, 4, rngs=nnx.Rngs(0))
        out = fuse(x1, x2)
        assert out.shape[-1] == width == fuse.out_dim == stages.fused_width(mode, 4)
        assert value is None or (out == value).all()
        assert not nnx.state(fuse, nnx.Param)  # no parameters
    fuse = stages.TwoStreamFusion("concat_mlp", 4, rngs=nnx.Rngs(0))
    assert fuse(x1, x2).shape == (2, 3, 4) and fuse.fc1.kernel.shape == (8, 8)
    with pytest.raises(ValueError, match="fusion must be one of"):
        stages.TwoStreamFusion("max", 4, rngs=nnx.Rngs(0))


def test_stage_with_concat_fusion_feeds_a_2c_transition():
    rngs = nnx.Rngs(0)
    make_f = lambda r: layers.MlpHalf(8, 8, rngs=r)  # noqa: E731
    stage = stages.Stage(make_f, make_f, depth=2, rngs=rngs, make_transition=lambda w, r: (
        layers.dense(w, 8, r)), in_dim=4, fusion="concat")
    assert stage.transition.kernel.shape == (8, 8) and stage.fusion.out_dim == 8
    assert stage.blocks.mode == revjax.DEFAULT_MODE == "reprop"
    x1, x2 = jnp.ones((2, 5, 4)), 2 * jnp.ones((2, 5, 4))
    y1, y2 = stage((x1, x2), mode="reprop")
    start = stage.transition(jnp.concatenate([x1, x2], -1))
    assert y1.shape == (2, 5, 8)
    assert rel_err(stage.blocks(start, start, mode="backprop")[1], y2) <= 1e-6
    with pytest.raises(ValueError, match="takes 2 stream"):
        stage((x1,))
    std = stages.Stage(make_f, make_f, depth=1, rngs=rngs, reversible=False,
                       make_transition=lambda w, r: layers.dense(w, 8, r), in_dim=4)
    assert std.fusion is None and std.transition.kernel.shape == (4, 8)
    assert std((x1,))[0].shape == (2, 5, 8)
    with pytest.raises(ValueError, match="backprop' only"):
        std((x1,), mode="reprop")


# --- the public surface and errors ----------------------------------------------------------


def test_standard_twin_has_one_stream_and_backprop_only():
    model, graphdef, params = model_and_params("swin-test")
    assert model.mode == "backprop" and model.norm.scale.shape == (32,)
    assert isinstance(model.stages[0].blocks, revjax.ResidualStack)
    assert model.stages[1].fusion is None
    x, y = batch(model.config)
    assert jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x).shape == (2, 10)
    with pytest.raises(ValueError, match="backprop' only"):
        model(x, mode="reprop")
    with pytest.raises(ValueError, match="backprop' only"):
        revjax.models.build("swin-test", rngs=nnx.Rngs(0), mode="pareprop")


def test_layout():
    model = abstract_model()
    assert model.mode == "reprop" and model.norm.scale.shape == (64,)
    assert isinstance(model.stages[0].blocks, revjax.RevStack) and model.stages[0].fusion is None
    paths = {".".join(map(str, p)) for p, _ in nnx.state(model, nnx.Param).flat_state()}
    assert {"stages.0.blocks.f.attn.qkv.kernel",
            "stages.0.blocks.f.attn.relative_position_bias_table",
            "stages.1.fusion.fc1.kernel", "stages.1.transition.reduction.kernel",
            "stages.1.transition.norm.scale", "patch_embed.norm.scale",
            "head.kernel"} <= paths
    assert model.stages[0].blocks.f.attn.relative_position_bias_table.shape == (2, 49, 1)
    assert model.stages[1].transition.reduction.kernel.shape == (64, 32)
    concat = abstract_model(fusion="concat")
    assert concat.stages[1].transition.reduction.kernel.shape == (128, 32)  # 4 * 2C in
    assert abstract_model(depths=[1, 1]).config.depths == (1, 1)
    names = revjax.models.names()
    assert all(f"{p}swin-{v}" in names for p in ("rev-", "") for v in swin.VARIANTS)


def test_initialisation():
    """As timm's ViT: truncated normal (0.02, cut at 2 std) weights and bias table, zero
    biases, LayerNorm 1 and 0."""
    model = concrete_model()
    f, transition = model.stages[1].blocks.f, model.stages[1].transition
    for w in (f.attn.relative_position_bias_table, f.attn.qkv.kernel,
              transition.reduction.kernel, model.stages[1].fusion.fc1.kernel):
        w = np.asarray(w[...])
        assert np.abs(w).max() <= 0.04 and 0.01 < w.std() < 0.02
    for b in (f.attn.qkv.bias, f.norm.bias, transition.norm.bias, model.head.bias):
        assert (np.asarray(b[...]) == 0).all()
    assert (np.asarray(transition.norm.scale[...]) == 1).all()
    assert model.stages[1].transition.norm.epsilon == layers.LN_EPS


def test_errors():
    model = concrete_model()
    x, _ = batch(model.config)
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        model(jnp.ones((2, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        model(jnp.ones((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((2, 3, 32, 32)))
    with pytest.raises(TypeError, match="floating-point"):
        model(jnp.ones((2, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        model(x, mode="fastest")
    build = functools.partial(revjax.models.build, "rev-swin-test", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"stage 1's 6x6 map is not divisible into 4x4"):
        build(img_size=24)
    with pytest.raises(ValueError, match="cannot be merged 2x2"):
        build(img_size=18, window_size=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build(img_size=33)
    with pytest.raises(ValueError, match="fusion must be one of"):
        build(fusion="max")
    with pytest.raises(ValueError, match="one entry per stage"):
        build(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="positive ints"):
        build(depths=(1, 0))
    with pytest.raises(ValueError, match="not divisible by heads"):
        build(heads=(3, 2))
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        build(drop_path_rate=1.0)
    with pytest.raises(TypeError, match="unknown override"):
        build(depth=3)
    with pytest.raises(KeyError, match="unknown model"):
        revjax.models.build("rev-swin-xl", rngs=nnx.Rngs(0))
