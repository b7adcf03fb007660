"""Rev-ViT and ViT in revjax: gradients per mode, optimizer steps, memory, counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import revjax
from revjax.models import vit
from revjax.train import train_step

from ..helpers import tree_rel_err
from .common import batch, grad_fn

TOL = {jnp.float64: 1e-9, jnp.float32: 1e-4}


def all_mode_grads(model, x, y, key=None):
    graphdef, params = nnx.split(model)
    return {m: grad_fn(graphdef)(params, x, y, m, key) for m in revjax.MODES}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_rev_vit_gradients_match_backprop(depth, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(depth), depth=depth,
                                    param_dtype=dtype)
        x, y = batch(model.config, dtype=dtype)
        grads = all_mode_grads(model, x, y)
        for mode in ("reprop", "pareprop"):
            assert tree_rel_err(grads[mode], grads["backprop"]) <= TOL[dtype], mode


def test_dropout_and_drop_path_are_replayed_exactly():
    with jax.enable_x64(True):
        model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), depth=3,
                                    param_dtype=jnp.float64, drop_rate=0.2,
                                    drop_path_rate=0.3)
        x, y = batch(model.config, n=4, dtype=jnp.float64)
        grads = all_mode_grads(model, x, y, key=jax.random.key(7))
        for mode in ("reprop", "pareprop"):
            assert tree_rel_err(grads[mode], grads["backprop"]) <= 1e-9
        graphdef, params = nnx.split(model)
        no_drop = grad_fn(graphdef)(params, x, y, "pareprop", None)
        assert tree_rel_err(no_drop, grads["pareprop"]) > 1e-3, "dropout must be active"


def _train(name, mode, tx, steps):
    model = revjax.models.build(name, rngs=nnx.Rngs(0), mode=mode)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = batch(model.config, n=8, seed=1)
    losses = [float(train_step(model, opt, x, y)) for _ in range(steps)]
    return losses, nnx.state(model, nnx.Param)


def test_sgd_steps_give_the_same_parameters_in_every_mode():
    ref_losses, ref = _train("rev-vit-test", "backprop", optax.sgd(0.05), 3)
    for mode in ("reprop", "pareprop"):
        losses, params = _train("rev-vit-test", mode, optax.sgd(0.05), 3)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert tree_rel_err(params, ref) <= 1e-5


@pytest.mark.parametrize("name,mode", [("rev-vit-test", m) for m in revjax.MODES]
                         + [("vit-test", "backprop")])
def test_adamw_lowers_the_loss(name, mode):
    losses, _ = _train(name, mode, optax.adamw(3e-3), 6)
    assert losses[-1] < 0.7 * losses[0], losses


def _temp_bytes(mode, depth):
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), depth=depth, img_size=64)
    graphdef, params = nnx.split(model)
    x, y = batch(model.config, n=8)
    lowered = grad_fn(graphdef).lower(params, x, y, mode, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", revjax.MODES)
def test_memory_over_depth(mode):
    one, four = _temp_bytes(mode, 3), _temp_bytes(mode, 12)
    if mode == "backprop":
        assert four > 2 * one, (one, four)
    else:
        assert four <= 1.1 * one, (one, four)


# Published parameter counts of the standard ViTs (with a class token): DeiT-Ti/S
# (Touvron et al., 2021), ViT-B/L/H (Dosovitskiy et al., 2021), in millions.
PUBLISHED = {"ti": 5.7, "s": 22.1, "b": 86.6, "l": 304.3, "h": 632.0}


def expected_count(c: vit.ViTConfig) -> int:
    """Independent count from the architecture: embed, position, layers, head."""
    d, hidden, n = c.dim, int(c.dim * c.mlp_ratio), (c.img_size // c.patch_size) ** 2
    embed = c.patch_size ** 2 * c.in_chans * d + d + n * d
    attn = 2 * d + 3 * d * d + 3 * d + d * d + d
    mlp = 2 * d + d * hidden + hidden + hidden * d + d
    width = 2 * d if c.reversible else d
    return embed + c.depth * (attn + mlp) + 2 * width + width * c.num_classes + c.num_classes


def param_count(name):
    model = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0)))
    return model.config, sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", list(vit.VARIANTS))
def test_parameter_counts(variant):
    rev_config, rev = param_count(f"rev-vit-{variant}")
    std_config, std = param_count(f"vit-{variant}")
    assert rev == expected_count(rev_config) and std == expected_count(std_config)
    # the reversible model differs only by its 2C-wide head norm and classifier
    assert rev - std == 2 * std_config.dim + std_config.dim * std_config.num_classes
    if variant in PUBLISHED:  # published: a class token and its position row (2 dim params)
        assert abs((std + 2 * std_config.dim) / 1e6 - PUBLISHED[variant]) < 0.051


def test_default_mode_is_reprop_and_pareprop_a_choice():
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0))
    assert model.mode == model.blocks.mode == revjax.DEFAULT_MODE == "reprop"
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), mode="pareprop")
    assert model.mode == model.blocks.mode == "pareprop"


def test_standard_twin_has_one_stream_and_backprop_only():
    model = revjax.models.build("vit-test", rngs=nnx.Rngs(0))
    assert model.mode == "backprop" and model.norm.scale.value.shape == (32,)
    with pytest.raises(ValueError, match="backprop' only"):
        revjax.models.build("vit-test", rngs=nnx.Rngs(0), mode="pareprop")
    x, _ = batch(model.config)
    with pytest.raises(ValueError, match="backprop' only"):
        model(x, mode="reprop")


def test_errors():
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0))
    x, _ = batch(model.config)
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        model(jnp.ones((2, 48, 48, 3)))
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        model(jnp.ones((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((2, 3, 32, 32)))
    with pytest.raises(TypeError, match="floating-point"):
        model(jnp.ones((2, 32, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        model(x, mode="fastest")
    with pytest.raises(KeyError, match="unknown model"):
        revjax.models.build("rev-vit-xxl", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unknown override"):
        revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), width=3)
    with pytest.raises(ValueError, match="not divisible"):
        revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), img_size=30)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), depth=0)


def test_registry_names():
    names = revjax.models.names()
    for v in vit.VARIANTS:
        assert f"rev-vit-{v}" in names and f"vit-{v}" in names
