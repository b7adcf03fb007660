"""One training run in each framework from the same initial weights (revtorch's, converted
with revjax.interop.torch), float64: AdamW (weight decay 0.05) with the warm-up/cosine
schedule and clipping at 1.0 on the same digits batches, Rev-ViT-test in pareprop. The loss
curves, gradient norms and final parameters agree to 1e-9 relative.

The first test writes the jax side by hand (optax's clip + AdamW, decay where the layer's own
tensor is a matrix, a float64 schedule and loss); the last one runs revjax.train's own
make_optimizer and make_train_step, which must agree as closely (its schedule is computed in
the default float dtype, float64 under x64, and its cross-entropy in float32 or wider)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import revjax
import revtorch
from experiments.train import data as data_lib
from revjax import train as JT
from revjax.interop.torch import from_torch, to_torch
from revtorch import train as TT

STEPS, TOTAL, WARMUP, LR, BATCH, SEED, WD = 5, 10, 2, 3e-3, 16, 0, 0.05
KW = dict(depth=2, img_size=8, patch_size=4, num_classes=10)


def batches():
    d = data_lib.load("digits", img_size=8, channels=3)
    for s in range(STEPS):
        idx = data_lib.batch_indices(len(d.train.x), BATCH, SEED, s)
        yield d.train.x[idx].astype(np.float64), d.train.y[idx]


def torch_run():
    torch.manual_seed(SEED)
    model = revtorch.models.build("rev-vit-test", mode="pareprop", param_dtype=torch.float64,
                                  **KW)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = TT.make_optimizer(model, LR, TOTAL, warmup_steps=WARMUP, clip_norm=1.0,
                                   weight_decay=WD)
    hist = []
    for x, y in batches():
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        m = TT.scheduled_train_step(model, opt, sched, (images, torch.from_numpy(y).long()),
                                    clip_norm=1.0)
        hist.append((m["loss"], m["grad_norm"]))
    return init, model.state_dict(), np.asarray(hist)


def schedule64(count):
    """revtorch.train.lr_factor (optax's warm-up/cosine) in float64."""
    c = jnp.asarray(count, jnp.float64)
    t = jnp.clip((c - WARMUP) / (TOTAL - WARMUP), 0.0, 1.0)
    return LR * jnp.where(c < WARMUP, c / WARMUP, 0.5 * (1.0 + jnp.cos(jnp.pi * t)))


def per_layer_matrices(params):
    """Decay where the layer's own tensor has ndim >= 2 (a stack's leaves carry a depth
    axis first: ``blocks/...``), as revtorch.train decays its per-layer modules."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim - (getattr(path[0], "key", None) == "blocks") >= 2, params)


def jax_run(init: dict, float64_loss: bool):
    with jax.enable_x64(True):
        model = nnx.eval_shape(lambda: revjax.models.build(
            "rev-vit-test", rngs=nnx.Rngs(SEED), mode="pareprop", param_dtype=jnp.float64,
            **KW))
        from_torch(model, init)
        if float64_loss:
            tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
                schedule64, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD,
                mask=per_layer_matrices))
        else:
            tx = JT.make_optimizer(LR, TOTAL, warmup_steps=WARMUP, clip_norm=1.0,
                                   weight_decay=WD)
        graphdef, state = nnx.split((model, JT.create_optimizer(model, tx)))
        if float64_loss:
            @jax.jit
            def step(state, batch, key):
                model, optimizer = nnx.merge(graphdef, state)
                images, labels = batch

                def loss_fn(m):
                    return optax.softmax_cross_entropy_with_integer_labels(
                        m(images, mode="pareprop"), labels).mean()

                loss, grads = nnx.value_and_grad(loss_fn)(model)
                norm = optax.global_norm(grads)
                optimizer.update(model, grads)
                return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": norm}
        else:
            step = JT.make_train_step(graphdef, mode="pareprop")
        hist = []
        for x, y in batches():
            state, m = step(state, (jnp.asarray(x), jnp.asarray(y)), None)
            hist.append((float(m["loss"]), float(m["grad_norm"])))
        model, _ = nnx.merge(graphdef, state)
        return to_torch(model), np.asarray(hist)


@pytest.fixture(scope="module")
def runs():
    init, final, hist = torch_run()
    return init, final, hist


def test_loss_curves_agree_from_the_same_initial_weights(runs):
    init, t_final, t_hist = runs
    j_final, j_hist = jax_run(init, float64_loss=True)
    rel = np.abs(j_hist - t_hist) / np.abs(t_hist)
    print("loss rel diff per step", rel[:, 0], "grad norm", rel[:, 1], "losses", t_hist[:, 0])
    assert rel.max() <= 1e-9, rel
    assert t_hist[-1, 0] < t_hist[0, 0]  # it trains
    err = max(((torch.as_tensor(j_final[k]) - t_final[k]).abs().max()
               / t_final[k].abs().max()).item() for k in t_final)
    moved = max((t_final[k] - init[k]).abs().max().item() for k in t_final)
    print("final parameters rel diff", err, "moved", moved)
    assert err <= 1e-9 and moved > 1e-3  # 4 updates of learning rate ~3e-3


def test_revjax_train_step_agrees_in_float64(runs):
    init, _, t_hist = runs
    _, j_hist = jax_run(init, float64_loss=False)
    rel = np.abs(j_hist - t_hist) / np.abs(t_hist)
    print("revjax.train step: loss rel diff per step", rel[:, 0])
    assert rel.max() <= 1e-9, rel
