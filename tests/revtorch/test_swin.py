"""Rev-Swin and Swin in revtorch: gradients per mode and fusion, dropout replay, memory over
stage depth, parameter counts, window attention and the shifted-window mask, stages and
fusion, errors."""

import numpy as np
import pytest
import torch

import revtorch
from revtorch import layers, models, stages
from revtorch.models import swin
from revtorch.train import cross_entropy_loss

from .common import max_grad_err, model_grads as grads, rel_err, saved_bytes

REV_MODES = ("reprop", "pareprop")


def build(name="rev-swin-test", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, param_dtype=dtype, **overrides)


def batch(dtype=torch.float64, n=2, img=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, img, img, generator=g, dtype=dtype)
    return images, torch.randint(0, 10, (n,), generator=g)


# --- gradients ------------------------------------------------------------------------------

# As in tests/revjax/test_swin.py: stage depths 1, 2, 3, every fusion, a last stage that fits
# in one window (img 16), and dropout + linear drop-path replayed by the backward.
GRAD_CASES = [
    dict(depths=(1, 1), fusion="avg"),
    dict(depths=(2, 2), fusion="add", img_size=16),
    dict(depths=(3, 1), fusion="concat"),
    dict(depths=(2, 3), fusion="concat_mlp", drop_rate=0.1, drop_path_rate=0.3),
]


@pytest.mark.parametrize("mode", REV_MODES)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c['depths']}-{c['fusion']}")
def test_gradients_match_backprop_float64(case, mode):
    model = build(**case).train()
    images, labels = batch(img=model.config.img_size)
    loss_b, want = grads(model, images, labels, "backprop")
    loss, got = grads(model, images, labels, mode)
    assert rel_err(loss, loss_b) <= 1e-12
    assert max_grad_err(got, want) <= 1e-9
    if not case.get("drop_rate"):  # (drop-path may drop a whole branch for the batch)
        assert all(g.abs().max() > 0 for g in want.values())
    else:  # the masks are really drawn: eval mode gives another loss
        pl = model.per_layer(1, train=True)
        assert pl["key"].shape == (3,) and torch.allclose(
            pl["drop_path"], torch.tensor([0.15, 0.225, 0.3]))
        model.eval()
        assert grads(model, images, labels, mode)[0] != loss


@pytest.mark.parametrize("mode", REV_MODES)
def test_gradients_match_backprop_float32(mode):
    model = build(dtype=torch.float32, depths=(2, 3))
    images, labels = batch(torch.float32)
    _, want = grads(model, images, labels, "backprop")
    _, got = grads(model, images, labels, mode)
    assert max_grad_err(got, want) <= 1e-4


def test_bfloat16_compute_under_autocast():
    torch.manual_seed(0)
    model = models.build("rev-swin-test", dtype=torch.bfloat16)
    images, labels = batch(torch.float32)
    logits = model(images, mode="pareprop")
    assert logits.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    cross_entropy_loss(logits, labels).backward()
    table = model.stages[0].blocks.f[0].attn.relative_position_bias_table
    assert table.grad.dtype == torch.float32 and table.grad.abs().max() > 0
    reference = models.build("rev-swin-test")
    reference.load_state_dict(model.state_dict())
    assert rel_err(logits, reference(images)) <= 0.05


# --- memory ---------------------------------------------------------------------------------


def _saved_bytes(mode, depths):
    """Bytes of the tensors saved for backward by forward + loss, leaving out the model's
    buffers (the constant shifted-window masks, passed as per-layer inputs)."""
    model = build(dtype=torch.float32, depths=depths)
    images, labels = batch(torch.float32, n=2)
    return saved_bytes(lambda: cross_entropy_loss(model(images, mode=mode), labels),
                       model.buffers())


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_saved_activation_bytes_over_stage_depth(mode):
    """Only the reversible stages get deeper (patch merging and fusion stay as they are)."""
    small, large = _saved_bytes(mode, (2, 2)), _saved_bytes(mode, (8, 8))
    if mode == "backprop":
        assert large > 3 * small
    else:
        assert large <= 1.1 * small


# --- parameter counts -----------------------------------------------------------------------

PUBLISHED = {"t": 28.3, "s": 49.6, "b": 87.8, "l": 197.0}  # Liu et al., 2021; millions
KNOWN = {"rev-swin-t": 30_221_122, "swin-t": 28_288_354, "rev-swin-s": 51_539_026,
         "swin-s": 49_606_258, "rev-swin-b": 90_861_344, "swin-b": 87_768_224,
         "rev-swin-l": 202_720_444, "swin-l": 196_532_476, "rev-swin-test": 24_238,
         "swin-test": 22_270}  # as revjax's


def count(c: swin.SwinConfig) -> int:
    """Parameters of a Swin config, counted from the architecture (independently of the
    code): embedding, blocks, fusion, merging, head."""
    n = c.in_chans * c.patch_size**2 * c.dim + c.dim + 2 * c.dim
    side = c.img_size // c.patch_size
    for i, (depth, heads) in enumerate(zip(c.depths, c.heads)):
        d, res = c.dim * 2**i, side // 2**i
        m, hidden = min(c.window_size, res), int(c.dim * 2**i * c.mlp_ratio)
        attn = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (2 * m - 1) ** 2 * heads
        mlp = 2 * d + (d * hidden + hidden) + (hidden * d + d)
        n += depth * (attn + mlp)
        if i:
            prev = width = d // 2
            if c.reversible and c.fusion == "concat_mlp":
                n += (4 * prev * prev + 2 * prev) + (2 * prev * prev + prev)
            if c.reversible and c.fusion == "concat":
                width = 2 * prev
            n += 8 * width + 4 * width * d
    width = c.dim * 2 ** (len(c.depths) - 1) * (2 if c.reversible else 1)
    return n + 2 * width + width * c.num_classes + c.num_classes


@pytest.mark.parametrize("variant", list(swin.VARIANTS))
def test_parameter_counts(variant):
    for name in (f"rev-swin-{variant}", f"swin-{variant}"):
        with torch.device("meta"):  # no allocation, even for Swin-L
            model = models.build(name)
        n = sum(p.numel() for p in model.parameters())
        assert n == count(model.config) == KNOWN[name], name
    if variant in PUBLISHED:
        assert abs(KNOWN[f"swin-{variant}"] / 1e6 - PUBLISHED[variant]) < 0.5


@pytest.mark.parametrize("fusion", stages.FUSIONS)
def test_parameter_counts_per_fusion(fusion):
    with torch.device("meta"):
        model = models.build("rev-swin-test", fusion=fusion, depths=(1, 3))
    assert sum(p.numel() for p in model.parameters()) == count(model.config)


# --- window attention and the shifted-window mask -------------------------------------------


def reference_attention(x, attn: swin.WindowAttention, bias_fn):
    """softmax(Q K^T / sqrt(d) + B) V for one window, B[h, i, j] = bias_fn(h, i, j)."""
    b, n, c = x.shape
    heads, d = attn.heads, c // attn.heads
    q, k, v = (attn.qkv(x)[..., j * c:(j + 1) * c].reshape(b, n, heads, d) for j in range(3))
    bias = torch.tensor([[[bias_fn(h, i, j) for j in range(n)] for i in range(n)]
                         for h in range(heads)], dtype=x.dtype)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5 + bias
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
    return attn.proj(out.reshape(b, n, c))


@torch.no_grad()
def test_one_unshifted_window_is_plain_attention_with_relative_bias():
    torch.manual_seed(0)
    m, dim, heads = 3, 8, 2
    attn = swin.WindowAttention(dim, heads, m).double()
    x = torch.randn(2, m * m, dim, dtype=torch.float64)
    # with a zero table it is the shared Attention module with the same weights
    plain = layers.Attention(dim, heads).double()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "relative" not in k})
    table = attn.relative_position_bias_table.clone()
    attn.relative_position_bias_table.zero_()
    assert rel_err(attn(x), plain(x)) <= 1e-13
    # with a table, B[h, i, j] is the table's row for the offset of tokens i and j
    attn.relative_position_bias_table.copy_(table)

    def bias(h, i, j):
        (yi, xi), (yj, xj) = divmod(i, m), divmod(j, m)
        return table[(yi - yj + m - 1) * (2 * m - 1) + (xi - xj + m - 1), h].item()

    assert rel_err(attn(x), reference_attention(x, attn, bias)) <= 1e-13
    # the half on an m x m map (one window, shift 0) is LayerNorm + that attention
    half = swin.WindowAttentionHalf(dim, heads, m).double()
    half.attn = attn
    grid = x.reshape(2, m, m, dim)
    want = attn(half.norm(grid).reshape(2, m * m, dim)).reshape(grid.shape)
    mask = torch.zeros(1, m * m, m * m, dtype=torch.float64)
    assert rel_err(half(grid, shift=torch.tensor(0), mask=mask), want) <= 1e-13


def test_relative_position_index_is_a_constant_buffer():
    attn = swin.WindowAttention(8, 2, 4)
    index = attn.relative_position_index
    assert index.shape == (16, 16) and index.dtype == torch.int64
    assert (index == torch.as_tensor(swin.relative_position_index(4))).all()
    assert len(index.unique()) == 49 and index[0, 15] == 0 and index[15, 0] == 48
    assert set(attn.state_dict()) == {"relative_position_bias_table", "qkv.weight",
                                      "qkv.bias", "proj.weight", "proj.bias"}
    assert attn.relative_position_bias_table.shape == (49, 2)


@pytest.mark.parametrize("res, m", [(8, 4), (16, 4), (14, 7)])
def test_shift_mask_allows_exactly_the_unwrapped_neighbours(res, m):
    """Tokens i, j of one rolled window may attend iff their original positions are within
    M - 1 of each other in both axes (no wrap between them); checked from the coordinates."""
    s = m // 2
    mask = swin.shift_mask(res, m, s)
    rolled = np.arange(res * res).reshape(1, res, res, 1)
    windows = swin.window_partition(rolled, m)[..., 0]  # (nW, N) rolled flat positions
    py, px = np.divmod(windows, res)
    oy, ox = (py + s) % res, (px + s) % res  # original coordinates
    near = ((np.abs(oy[:, :, None] - oy[:, None, :]) < m)
            & (np.abs(ox[:, :, None] - ox[:, None, :]) < m))
    assert mask.shape == ((res // m) ** 2, m * m, m * m)
    assert ((mask == 0) == near).all() and (mask[~near] == swin.MASK_VALUE).all()
    assert (swin.shift_mask(res, m, 0) == 0).all() and not near.all()


@torch.no_grad()
def test_shifted_layer_does_not_attend_across_the_wrapped_border():
    torch.manual_seed(0)
    res, m, dim = 8, 4, 8
    half = swin.WindowAttentionHalf(dim, 2, m).double()
    x = torch.randn(1, res, res, dim, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 1] += torch.randn(dim, dtype=torch.float64)  # not a constant: LayerNorm removes it
    mask = torch.as_tensor(swin.shift_mask(res, m, m // 2)).double()
    shift = torch.tensor(2)
    changed = (half(y, shift=shift, mask=mask) - half(x, shift=shift, mask=mask)).abs()
    changed = changed.amax(-1)[0] > 0
    # row 7 shares the rolled window with row 0 but is not its neighbour: unchanged
    assert not changed[7, 1] and not changed[6, 0] and changed[1, 1] and changed[0, 1]
    assert changed.sum() == 4  # its wrapped corner of the window: rows 0-1 x columns 0-1
    unmasked = half(y, shift=shift) - half(x, shift=shift)
    assert unmasked[0, 7, 1].abs().max() > 0  # the mask is what cuts it


def test_per_layer_shifts_and_masks():
    model = build(depths=(3, 2))
    assert [(g.resolution, g.window, g.shift) for g in model.geometry] == [(16, 4, 2),
                                                                           (8, 4, 2)]
    pl = model.per_layer(0)
    assert set(pl) == {"shift", "mask"} and pl["shift"].tolist() == [0, 2, 0]
    assert pl["shift"].device.type == "cpu" and pl["mask"].shape == (3, 16, 16, 16)
    assert (pl["mask"][0] == 0).all() and (pl["mask"][2] == 0).all() and (pl["mask"][1] < 0).any()
    assert "stage0_mask" not in model.state_dict()
    with torch.device("meta"):
        t = models.build("swin-t")
    assert [(g.resolution, g.dim, g.window, g.shift) for g in t.geometry] == [
        (56, 96, 7, 3), (28, 192, 7, 3), (14, 384, 7, 3), (7, 768, 7, 0)]
    rates = swin.drop_path_rates(swin.SwinConfig("x", True, 8, (2, 2, 6, 2), (1, 1, 1, 1),
                                                 drop_path_rate=0.2))
    np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.2, 12), rtol=1e-6)


@torch.no_grad()
def test_patch_merging_takes_2x2_neighbourhoods_in_swin_order():
    torch.manual_seed(0)
    merge = swin.PatchMerging(3, 6).double()
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    # Swin's order, written with strided slices: offsets (0,0), (1,0), (0,1), (1,1) in (y, x)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert merge(x).shape == (2, 2, 3, 6)
    assert rel_err(merge(x), merge.reduction(merge.norm(cat))) <= 1e-14
    assert merge.reduction.bias is None and merge.norm.normalized_shape == (12,)


def test_branch_dropout_with_per_layer_rates():
    x = torch.ones(1000, 3)
    assert layers.branch_dropout(x, 0.0, 0.5, None, 0) is x
    assert layers.branch_dropout(x, 0.0, torch.tensor(0.0), 5, 0) is x
    out = layers.branch_dropout(x, 0.0, torch.tensor(0.5), 5, 1)
    assert set(out.unique().tolist()) == {0.0, 2.0} and 0.4 < (out[:, 0] == 0).double().mean() < 0.6
    assert ((out == 0).all(1) | (out == 2).all(1)).all()  # whole samples


# --- stages and fusion ----------------------------------------------------------------------


def test_two_stream_fusion():
    x1, x2 = torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), 3.0)
    want = {"avg": (4, 2.0), "add": (4, 4.0), "concat": (8, None)}
    for mode, (width, value) in want.items():
        fuse = stages.TwoStreamFusion(mode, 4)
        out = fuse(x1, x2)
        assert out.shape[-1] == width == fuse.out_dim == stages.fused_width(mode, 4)
        assert value is None or (out == value).all()
        assert not list(fuse.parameters())
    fuse = stages.TwoStreamFusion("concat_mlp", 4)
    assert fuse(x1, x2).shape == (2, 3, 4) and fuse.fc1.weight.shape == (8, 8)
    with pytest.raises(ValueError, match="fusion must be one of"):
        stages.TwoStreamFusion("max", 4)


def test_stage_with_concat_fusion_feeds_a_2c_transition():
    torch.manual_seed(0)
    make = lambda: layers.MlpHalf(8, 8)  # noqa: E731
    stage = stages.Stage(make, make, depth=2, make_transition=lambda w: layers.dense(w, 8),
                         in_dim=4, fusion="concat").double()
    assert stage.transition.weight.shape == (8, 8) and stage.fusion.out_dim == 8
    assert stage.blocks.mode == revtorch.DEFAULT_MODE == "reprop"
    x1 = torch.ones(2, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = 2 * torch.ones(2, 5, 4, dtype=torch.float64)
    y1, y2 = stage((x1, x2), mode="reprop")
    start = stage.transition(torch.cat([x1, x2], -1))
    assert y1.shape == (2, 5, 8)
    assert rel_err(y2, stage.blocks(start, start, mode="backprop")[1]) <= 1e-14
    (y1.sum() + y2.sum()).backward()
    assert x1.grad.abs().max() > 0  # the transition is differentiated under plain autograd
    with pytest.raises(ValueError, match="takes 2 stream"):
        stage((x1,))
    std = stages.Stage(make, make, depth=1, reversible=False,
                       make_transition=lambda w: layers.dense(w, 8), in_dim=4).double()
    assert std.fusion is None and std.transition.weight.shape == (8, 4)
    assert std((x2,))[0].shape == (2, 5, 8)
    with pytest.raises(ValueError, match="backprop' only"):
        std((x2,), mode="reprop")


# --- the public surface and errors ----------------------------------------------------------


def test_standard_twin_has_one_stream_and_backprop_only():
    model = build("swin-test")
    assert model.mode == "backprop" and model.norm.normalized_shape == (32,)
    assert isinstance(model.stages[0].blocks, revtorch.ResidualStack)
    assert model.stages[1].fusion is None
    images, labels = batch()
    loss, got = grads(model, images, labels, None)
    assert torch.isfinite(loss) and all(g.abs().max() > 0 for g in got.values())
    for mode in REV_MODES:
        with pytest.raises(ValueError, match="backprop' only"):
            model(images, mode=mode)
        with pytest.raises(ValueError, match="backprop' only"):
            models.build("swin-test", mode=mode)


def test_layout():
    model = build()
    assert model.mode == "reprop" and model.norm.normalized_shape == (64,)
    assert isinstance(model.stages[0].blocks, revtorch.RevStack)
    assert model.stages[0].fusion is None and model.stages[0].transition is None
    keys = set(model.state_dict())
    assert {"stages.0.blocks.f.0.attn.qkv.weight",
            "stages.0.blocks.f.1.attn.relative_position_bias_table",
            "stages.1.fusion.fc1.weight", "stages.1.transition.reduction.weight",
            "stages.1.transition.norm.weight", "patch_embed.norm.weight",
            "head.weight"} <= keys
    assert not any("mask" in k or "index" in k for k in keys)  # constants stay out
    assert model.stages[1].transition.reduction.weight.shape == (32, 64)
    concat = build(fusion="concat")
    assert concat.stages[1].transition.reduction.weight.shape == (32, 128)  # 4 * 2C in
    assert build(depths=[1, 1]).config.depths == (1, 1)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    names = models.names()
    assert all(f"{p}swin-{v}" in names for p in ("rev-", "") for v in swin.VARIANTS)


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(2, 3, 64, 64), ValueError, r"\(batch, 3, 32, 32\) \(NCHW\)"),
        (torch.randn(2, 1, 32, 32), ValueError, "NCHW"),
        (torch.randn(2, 32, 32, 3), ValueError, "NCHW"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
    ],
)
def test_image_errors(images, error, match):
    with pytest.raises(error, match=match):
        build()(images)


def test_build_errors():
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
    with pytest.raises(ValueError, match="compute"):
        models.build("rev-swin-test", dtype=torch.float64)  # float32 parameters
    with pytest.raises(ValueError, match="mode must be one of"):
        build()(batch()[0], mode="fast")
    with pytest.raises(KeyError, match="unknown model"):
        models.build("rev-swin-xl")
