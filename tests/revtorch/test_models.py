"""Shared layers, the registry, Rev-ViT and ViT: gradients per mode, training, memory,
parameter counts, dropout replay, errors."""

import copy

import pytest
import torch
from torch import nn

import revtorch
from revtorch import layers, models
from revtorch.models.vit import VARIANTS, ViTConfig
from revtorch.train import cross_entropy_loss, train_step

from .common import max_grad_err, model_grads as grads, rel_err, saved_bytes

REV_MODES = ("reprop", "pareprop")


def vit(name="rev-vit-test", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, param_dtype=dtype, **overrides)


def batch(dtype=torch.float64, n=4, img=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, img, img, generator=g, dtype=dtype)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


# --- the public surface -------------------------------------------------------------------


def test_registry_and_layout():
    want = {f"{p}vit-{v}" for p in ("rev-", "") for v in ("ti", "s", "b", "l", "h", "test")}
    vit_names = [n for n in models.names() if n.startswith(("rev-vit-", "vit-"))]
    assert set(vit_names) == want and models.names() == sorted(models.names())
    assert revtorch.models is models and revtorch.ResidualStack is not None
    rev, std = vit(), vit("vit-test")
    assert rev.mode == "reprop" and std.mode == "backprop"
    assert isinstance(rev.blocks, revtorch.RevStack) and rev.blocks.mode == "reprop"
    assert isinstance(std.blocks, revtorch.ResidualStack)
    assert rev.config.reversible and not std.config.reversible
    assert isinstance(rev.patch_embed.proj, nn.Conv2d) and rev.pos_embed.shape == (1, 16, 32)
    assert rev.norm.normalized_shape == (64,) and std.norm.normalized_shape == (32,)
    assert rev.norm.eps == layers.LN_EPS == 1e-6
    f, g = rev.blocks.f[0], rev.blocks.g[1]
    assert isinstance(f, layers.AttentionHalf) and isinstance(g, layers.MlpHalf)
    assert f.attn.qkv.weight.shape == (96, 32) and g.mlp.fc1.weight.shape == (128, 32)
    assert all(p.dtype == torch.float64 for p in rev.parameters())
    assert models.build("rev-vit-test", mode="pareprop").blocks.mode == "pareprop"
    names = {n for n, _ in rev.named_parameters()}
    assert {"pos_embed", "patch_embed.proj.weight", "blocks.f.1.attn.qkv.bias",
            "blocks.g.0.mlp.fc2.weight", "blocks.g.0.norm.weight", "norm.bias",
            "head.weight"} <= names


def test_initialisation():
    torch.manual_seed(0)
    w = layers.dense(400, 500)
    assert w.bias.abs().max() == 0
    assert w.weight.abs().max() <= 0.04 and 0.016 < w.weight.std() < 0.019  # cut at 2 std
    model = vit("vit-test")
    assert (model.blocks.f[0].norm.weight == 1).all() and (model.norm.bias == 0).all()
    assert (model.patch_embed.proj.bias == 0).all() and model.pos_embed.abs().max() <= 0.04


def count(c: ViTConfig) -> int:
    """Parameters of a ViT config, counted from the architecture (independently of the code)."""
    dim, hidden, width = c.dim, int(c.dim * c.mlp_ratio), (2 if c.reversible else 1) * c.dim
    tokens = (c.img_size // c.patch_size) ** 2
    embed = c.in_chans * c.patch_size**2 * dim + dim + tokens * dim
    attn = 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    mlp = 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    return embed + c.depth * (attn + mlp) + 2 * width + width * c.num_classes + c.num_classes


@pytest.mark.parametrize("name", [n for n in models.names() if n.startswith(("rev-vit-", "vit-"))])
def test_parameter_counts(name):
    with torch.device("meta"):  # no allocation, even for ViT-H
        model = models.build(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == count(model.config)
    known = {"rev-vit-s": 22_434_664, "vit-s": 22_049_896, "rev-vit-test": 32_874,
             "vit-test": 32_490}  # as revjax's
    assert n == known.get(name, n)


def test_patch_embed_token_order():
    """Token t is the patch at row t // w, column t % w (row-major, as the JAX NHWC reshape)."""
    pe = layers.PatchEmbed(12, 4, 1, 1).double()
    with torch.no_grad():
        pe.proj.weight.fill_(1.0)
        pe.proj.bias.zero_()
    x = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    x[0, 0, 4, 8] = 1.0  # patch row 1, column 2
    tokens = pe(x)
    assert tokens.shape == (1, 9, 1) and tokens[0, :, 0].argmax() == 1 * 3 + 2


def test_attention_mask():
    torch.manual_seed(0)
    attn = layers.Attention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = attn(x, mask)
    assert rel_err(out[1], attn(x[1:])[0]) <= 1e-14  # all attended: as without a mask
    # the masked keys have no influence: changing them leaves every output unchanged
    y = x.clone()
    y[0, 3:] = torch.randn(2, 8, dtype=torch.float64)
    k_only = attn(y, mask)[0, :3]
    assert rel_err(k_only, out[0, :3]) <= 1e-14


# --- gradients per mode --------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("mode", REV_MODES)
def test_gradients_match_backprop_float64(mode, depth):
    model = vit(depth=depth)
    images, labels = batch()
    loss_b, want = grads(model, images, labels, "backprop")
    loss, got = grads(model, images, labels, mode)
    assert rel_err(loss, loss_b) <= 1e-12
    assert max_grad_err(got, want) <= 1e-9
    assert all(g.abs().max() > 0 for g in want.values())


@pytest.mark.parametrize("mode", REV_MODES)
def test_gradients_match_backprop_float32(mode):
    model = vit(dtype=torch.float32, depth=3)
    images, labels = batch(torch.float32)
    _, want = grads(model, images, labels, "backprop")
    _, got = grads(model, images, labels, mode)
    assert max_grad_err(got, want) <= 1e-4


@pytest.mark.parametrize("mode", REV_MODES)
def test_dropout_and_drop_path_replay_exactly(mode):
    model = vit(depth=3, drop_rate=0.2, drop_path_rate=0.3).train()
    images, labels = batch(n=8)
    loss_b, want = grads(model, images, labels, "backprop", seed=3)
    loss, got = grads(model, images, labels, mode, seed=3)
    assert rel_err(loss, loss_b) <= 1e-12
    assert max_grad_err(got, want) <= 1e-9
    # the masks are really drawn: another seed, or eval mode, gives another loss
    loss_other, _ = grads(model, images, labels, mode, seed=4)
    model.eval()
    loss_eval, _ = grads(model, images, labels, mode, seed=3)
    assert loss_other != loss and loss_eval != loss


def test_dropout_keys_and_masks():
    model = vit(depth=2, drop_rate=0.5).train()
    images, _ = batch()
    torch.manual_seed(0)
    a = model(images)
    torch.manual_seed(0)
    assert torch.equal(a, model(images))  # reproducible from torch.manual_seed
    keys = layers.layer_keys(4)["key"]
    assert keys.shape == (4,) and keys.dtype == torch.int64 and len(set(keys.tolist())) == 4
    x = torch.ones(1000, 10, dtype=torch.float64)
    f = layers.dropout(x, 0.25, layers.generator_for(keys[0], 0, x.device))
    g = layers.dropout(x, 0.25, layers.generator_for(keys[0], 1, x.device))
    assert set(f.unique().tolist()) == {0.0, 4 / 3} and 0.2 < (f == 0).double().mean() < 0.3
    assert not torch.equal(f, g)  # F and G of a layer draw independent masks
    p = layers.drop_path(x, 0.5, layers.generator_for(keys[1], 0, x.device))
    assert ((p == 0).all(1) | (p == 2).all(1)).all()  # whole samples dropped or scaled
    assert layers.dropout(x, 0.5, None) is x and layers.drop_path(x, 0.0, torch.Generator()) is x


def test_standard_twin_trains_with_dropout():
    model = vit("vit-test", depth=2, drop_rate=0.1, drop_path_rate=0.1).train()
    images, labels = batch()
    loss, got = grads(model, images, labels, None)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in got.values())


# --- training ------------------------------------------------------------------------------


def test_sgd_steps_match_across_modes():
    base = vit(depth=3)
    images, labels = batch()
    trained = {}
    for mode in revtorch.MODES:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = [train_step(model, opt, images, labels, mode=mode) for _ in range(3)]
        trained[mode] = (losses, dict(model.named_parameters()))
    want_losses, want = trained["backprop"]
    for mode in REV_MODES:
        losses, got = trained[mode]
        assert max(abs(a - b) for a, b in zip(losses, want_losses)) <= 1e-12
        assert max(rel_err(got[k], want[k]) for k in want) <= 1e-9
        assert max(rel_err(got[k], base.state_dict()[k]) for k in want) > 1e-3  # it moved


@pytest.mark.parametrize(
    "name, mode",
    [("rev-vit-test", m) for m in revtorch.MODES] + [("vit-test", "backprop")],
)
def test_adamw_lowers_the_loss(name, mode):
    model = vit(name, dtype=torch.float32)
    images, labels = batch(torch.float32, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [train_step(model, opt, images, labels, mode=mode) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]


def test_bfloat16_compute_under_autocast():
    torch.manual_seed(0)
    model = models.build("rev-vit-test", dtype=torch.bfloat16)
    images, labels = batch(torch.float32)
    logits = model(images, mode="reprop")
    assert logits.dtype == torch.bfloat16 and model.pos_embed.dtype == torch.float32
    cross_entropy_loss(logits, labels).backward()
    assert model.pos_embed.grad.dtype == torch.float32
    reference = models.build("rev-vit-test")
    reference.load_state_dict(model.state_dict())
    assert rel_err(logits, reference(images)) <= 0.05


# --- memory --------------------------------------------------------------------------------


def _saved_bytes(mode, depth):
    """Bytes of the tensors saved for backward by forward + loss on a Rev-ViT."""
    model = vit(dtype=torch.float32, depth=depth)
    images, labels = batch(torch.float32, n=4)
    return saved_bytes(lambda: cross_entropy_loss(model(images, mode=mode), labels))


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_saved_activation_bytes(mode):
    small, large = _saved_bytes(mode, 2), _saved_bytes(mode, 8)
    if mode == "backprop":
        assert large > 3 * small
    else:
        assert large <= 1.1 * small


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(2, 3, 16, 16), ValueError, r"\(batch, 3, 32, 32\) \(NCHW\)"),
        (torch.randn(2, 1, 32, 32), ValueError, "NCHW"),
        (torch.randn(2, 32, 32, 3), ValueError, "NCHW"),
        (torch.randn(3, 32, 32), ValueError, "NCHW"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
    ],
)
def test_image_errors(images, error, match):
    with pytest.raises(error, match=match):
        vit()(images)


def test_mode_errors():
    images, _ = batch()
    std = vit("vit-test")
    for mode in REV_MODES:
        with pytest.raises(ValueError, match="backprop' only"):
            std(images, mode=mode)
        with pytest.raises(ValueError, match="backprop' only"):
            models.build("vit-test", mode=mode)
    with pytest.raises(ValueError, match="mode must be one of"):
        vit()(images, mode="fast")


def test_build_errors():
    with pytest.raises(KeyError, match="unknown model 'rev-vit-xl'"):
        models.build("rev-vit-xl")
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['width'\]"):
        models.build("rev-vit-test", width=64)
    with pytest.raises(TypeError, match="unknown override"):
        models.build("rev-vit-test", reversible=False)
    with pytest.raises(ValueError, match="not divisible by heads"):
        models.build("rev-vit-test", heads=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        models.build("rev-vit-test", img_size=30)
    with pytest.raises(ValueError, match="compute"):
        models.build("rev-vit-test", dtype=torch.float64)
    with pytest.raises(TypeError, match="param_dtype"):
        models.build("rev-vit-test", param_dtype=torch.int32)
    with pytest.raises(ValueError, match="registered twice"):
        models.register("rev-vit-test", lambda **kw: None)
    assert VARIANTS["h"]["patch_size"] == 14


def test_residual_stack():
    torch.manual_seed(0)
    stack = revtorch.ResidualStack(lambda: layers.AttentionHalf(8, 2),
                                   lambda: layers.MlpHalf(8, 16), depth=3).double()
    assert len(stack.f) == len(stack.g) == 3 and "depth=3" in repr(stack)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    want = x
    for f, g in zip(stack.f, stack.g):
        want = want + f(want)
        want = want + g(want)
    assert rel_err(stack(x), want) <= 1e-15
    with pytest.raises(ValueError, match="at least 1"):
        revtorch.ResidualStack(nn.Identity, nn.Identity, depth=0)
    with pytest.raises(TypeError, match="int"):
        revtorch.ResidualStack(nn.Identity, nn.Identity, depth=2.0)
    with pytest.raises(ValueError, match="leading axis 3"):
        stack(x, per_layer={"key": torch.zeros(2, dtype=torch.int64)})
