"""``revjax.RevStack``: NNX transforms, optimizers, modes as a switch, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import revjax

from ..helpers import tree_rel_err

DIM = 8


class F(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(DIM, epsilon=1e-6, rngs=rngs)
        self.lin = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x, mask, *, scale):
        return self.lin(self.ln(x)) * mask * scale


class G(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.l2 = nnx.Linear(2 * DIM, DIM, rngs=rngs)

    def __call__(self, x, mask, **_):
        return self.l2(nnx.gelu(self.l1(x), approximate=False))


def build(depth, mode="pareprop", seed=0):
    return revjax.RevStack(F, G, depth=depth, rngs=nnx.Rngs(seed), mode=mode)


def data(depth):
    x = jax.random.normal(jax.random.key(1), (2, 5, DIM))
    mask = jnp.ones((5, 1)).at[0].set(0.0)
    return x, mask, {"scale": jnp.linspace(0.5, 1.0, depth)[:, None]}


def loss_fn(model, x, mask, pl, mode=None):
    y1, y2 = model(x, x, mask, per_layer=pl, mode=mode)
    return jnp.mean((y1 - 0.3) ** 2) + jnp.mean(y1 * y2)


@nnx.jit(static_argnums=4)
def value_and_grad(model, x, mask, pl, mode):
    return nnx.value_and_grad(loss_fn)(model, x, mask, pl, mode)


def test_parameters_stacked_on_depth():
    model = build(3)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(a.shape[0] == 3 for a in leaves)
    kernels = nnx.state(model, nnx.Param)["f"]["lin"]["kernel"].value
    assert not np.allclose(kernels[0], kernels[1]), "layers must be initialised independently"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_modes_are_a_switch_with_equal_gradients(depth):
    model = build(depth)
    x, mask, pl = data(depth)
    ref_loss, ref = value_and_grad(model, x, mask, pl, "backprop")
    for mode in ("reprop", "pareprop"):
        loss, grads = value_and_grad(model, x, mask, pl, mode)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        assert tree_rel_err(grads, ref) <= 1e-4


def _sgd_steps(mode, steps=3):
    model = build(3, mode=mode)
    x, mask, pl = data(3)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, mask, pl)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return losses, nnx.state(model, nnx.Param)


def test_sgd_steps_agree_across_modes():
    ref_losses, ref = _sgd_steps("backprop")
    for mode in ("reprop", "pareprop"):
        losses, params = _sgd_steps(mode)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert tree_rel_err(params, ref) <= 1e-5


def test_adamw_lowers_the_loss():
    model = build(2)
    x, mask, pl = data(2)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, mask, pl)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


class Counting(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(DIM, DIM, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros(()))

    def __call__(self, x, *_, **__):
        self.calls.value = self.calls.value + 1
        return self.lin(x)


class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.bn = nnx.BatchNorm(DIM, rngs=rngs)

    def __call__(self, x, *_, **__):
        return self.bn(x)


class WithDropoutStream(nnx.Module):
    def __init__(self, rngs):
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x, *_, **__):
        return self.drop(x)


class Widening(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(DIM, 2 * DIM, rngs=rngs)

    def __call__(self, x, *_, **__):
        return self.lin(x)


def test_default_mode_is_reprop():
    """reprop by default (pareprop holds more memory per sample on the GPU compile); pareprop
    stays a choice per stack."""
    assert revjax.DEFAULT_MODE == "reprop" and revjax.DEFAULT_MODE in revjax.MODES
    assert revjax.RevStack(F, G, depth=1, rngs=nnx.Rngs(0)).mode == revjax.DEFAULT_MODE
    assert revjax.RevStack(F, G, depth=1, rngs=nnx.Rngs(0), mode="pareprop").mode == "pareprop"


def test_errors():
    with pytest.raises(ValueError, match="depth must be a positive int"):
        revjax.RevStack(F, G, depth=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode must be one of"):
        revjax.RevStack(F, G, depth=1, rngs=nnx.Rngs(0), mode="fast")
    with pytest.raises(ValueError, match="BatchStat"):
        revjax.RevStack(WithBatchNorm, G, depth=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RNG"):
        revjax.RevStack(WithDropoutStream, G, depth=1, rngs=nnx.Rngs(0))
    x = jnp.ones((2, DIM))
    with pytest.raises(ValueError, match="updated its state"):
        revjax.RevStack(Counting, G, depth=2, rngs=nnx.Rngs(0))(x, x)
    with pytest.raises(ValueError, match="must return its input's shape"):
        revjax.RevStack(Widening, G, depth=2, rngs=nnx.Rngs(0))(x, x)
    model = build(2)
    x, mask, pl = data(2)
    with pytest.raises(ValueError, match="shape and dtype"):
        model(x, x[..., :4], mask, per_layer=pl)
    with pytest.raises(ValueError, match="mode must be one of"):
        model(x, x, mask, per_layer=pl, mode="nope")


# ------------------------------------------------------------- remat (standard-twin baseline)


def _residual_grads_and_temp(depth, remat):
    model = revjax.models.build("vit-test", rngs=nnx.Rngs(0), depth=depth, dim=16, heads=2,
                                img_size=16, patch_size=4, dtype=jnp.float64,
                                param_dtype=jnp.float64)
    revjax.set_remat(model, remat)
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3), jnp.float64)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled(params), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_remat_gradients_equal_plain_autodiff_and_save_less(depth):
    with jax.enable_x64(True):
        plain, plain_temp = _residual_grads_and_temp(depth, None)
        for policy in revjax.REMAT_POLICIES:
            grads, temp = _residual_grads_and_temp(depth, policy)
            assert tree_rel_err(grads, plain) <= 1e-12, policy
            if depth >= 3:
                assert temp < plain_temp, (policy, temp, plain_temp)


def test_remat_memory_grows_slower_with_depth_than_plain():
    with jax.enable_x64(True):
        temps = {p: [_residual_grads_and_temp(d, p)[1] for d in (2, 8)]
                 for p in (None, "nothing_saveable")}
    growth = {p: t[1] - t[0] for p, t in temps.items()}
    assert growth["nothing_saveable"] < 0.5 * growth[None], growth


def test_remat_errors():
    rev = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no ResidualStack"):
        revjax.set_remat(rev, "nothing_saveable")
    std = revjax.models.build("vit-test", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat must be None or one of"):
        revjax.set_remat(std, "everything")
    with pytest.raises(ValueError, match="remat must be None or one of"):
        revjax.ResidualStack(F, G, depth=1, rngs=nnx.Rngs(0), remat="dots")
    assert revjax.set_remat(std, None) is std
