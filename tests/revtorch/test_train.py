"""revtorch.train: the schedule of revjax.train (optax), AdamW's decay groups, the scheduled
step in every mode (equal parameters in float64), clipping, bf16 / fp16 steps, eval sums."""

import math

import numpy as np
import pytest
import torch

import revtorch
from revtorch import models
from revtorch.mlm import IGNORE
from revtorch.train import (eval_step, learning_rate, make_optimizer, scheduled_train_step,
                            train_step)

from .common import rel_err


def vit(param_dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build("rev-vit-test", param_dtype=param_dtype, **overrides)


def images(dtype=torch.float64, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=g, dtype=dtype),
            torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("total, warmup", [(50, None), (20, 0), (30, 7), (3, 1)])
def test_schedule_matches_optax(total, warmup):
    optax = pytest.importorskip("optax")
    w = max(1, total // 10) if warmup is None else warmup
    want = optax.warmup_cosine_decay_schedule(0.0, 3e-3, w, total, 0.0)
    model = torch.nn.Linear(3, 2)
    opt, sched = make_optimizer(model, 3e-3, total, warmup_steps=warmup)
    got = []
    for step in range(total + 3):
        got.append(opt.param_groups[0]["lr"])
        assert learning_rate(step, 3e-3, total, warmup) == pytest.approx(got[-1], abs=1e-15)
        opt.step()
        sched.step()
    ref = np.asarray([float(want(s)) for s in range(total + 3)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-10)
    assert got[0] == (0.0 if w else 3e-3) and got[total] == pytest.approx(0.0, abs=1e-12)


def test_optimizer_decays_matrices_only_and_checks_arguments():
    model = vit(torch.float32)
    opt, _ = make_optimizer(model, 1e-3, 10, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["params"]
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    for kw in (dict(total_steps=0), dict(total_steps=10, warmup_steps=10),
               dict(total_steps=10, clip_norm=0.0)):
        with pytest.raises(ValueError):
            make_optimizer(model, 1e-3, **kw)


def _one_step(model, batch, mode, task, lr=0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = scheduled_train_step(model, opt, None, batch, task=task, mode=mode, clip_norm=None)
    return out, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("task", ["classification", "mlm"])
def test_step_equal_across_modes_float64(task):
    if task == "classification":
        build = lambda: vit()
        batch = images()
    else:
        def build():
            torch.manual_seed(0)
            return models.build("rev-roberta-test", param_dtype=torch.float64)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(4, 100, (3, 16), generator=g)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[1, 12:] = False
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, IGNORE)
        labels[0, 0] = ids[0, 0]
        batch = (ids, labels, mask)
    base = build().state_dict()
    results = {m: _one_step(build(), batch, m, task) for m in revtorch.MODES}
    (want_out, want) = results["backprop"]
    assert math.isfinite(want_out["loss"]) and want_out["grad_norm"] > 0
    for mode in ("reprop", "pareprop"):
        out, got = results[mode]
        assert abs(out["loss"] - want_out["loss"]) <= 1e-12 * abs(want_out["loss"])
        assert abs(out["grad_norm"] - want_out["grad_norm"]) <= 1e-9 * want_out["grad_norm"]
        assert max(rel_err(got[k], want[k]) for k in want) <= 1e-9
    assert max(rel_err(want[k], base[k]) for k in want) > 1e-4  # the step moved the weights


def test_clipping_bounds_the_update():
    batch = images()
    model = vit()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = scheduled_train_step(model, opt, None, batch, mode="reprop", clip_norm=1e-3)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in
                           zip(model.parameters(), before)))
    assert out["grad_norm"] > 1e-2  # the gradient was larger than the clip
    assert float(delta) == pytest.approx(1e-3, rel=1e-5)  # SGD lr 1: update = clipped grad
    # no clipping: the update is the whole gradient
    model = vit()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out2 = scheduled_train_step(model, opt, None, batch, mode="reprop", clip_norm=None)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in
                           zip(model.parameters(), before)))
    assert out2["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-12)
    assert float(delta) == pytest.approx(out2["grad_norm"], rel=1e-9)


def test_scheduler_steps_and_lr_reported():
    model = vit(torch.float32)
    x, y = images(torch.float32)
    opt, sched = make_optimizer(model, 1e-2, 10, warmup_steps=2)
    lrs = [scheduled_train_step(model, opt, sched, (x, y), mode="pareprop")["lr"]
           for _ in range(3)]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2])


def test_bfloat16_autocast_step():
    model = vit(torch.float32, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = make_optimizer(model, 1e-3, 10, warmup_steps=0)
    for mode in ("reprop", "pareprop"):
        out = scheduled_train_step(model, opt, sched, images(torch.float32), mode=mode)
        assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max(rel_err(v, before[k]) for k, v in model.state_dict().items()) > 0


def test_float16_with_grad_scaler():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    except (RuntimeError, TypeError, ValueError) as e:  # pragma: no cover
        pytest.skip(f"this torch has no float16 autocast / GradScaler on CPU: {e}")
    model = vit(torch.float32, dtype=torch.float16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = make_optimizer(model, 1e-3, 10, warmup_steps=0)
    out = scheduled_train_step(model, opt, sched, images(torch.float32), mode="reprop",
                               scaler=scaler)
    assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    assert scaler.get_scale() == 2.0 ** 8  # finite gradients: no back-off
    assert max(rel_err(v, before[k]) for k, v in model.state_dict().items()) > 0
    # an overflowing scale: the step is skipped and the scale backs off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = scheduled_train_step(model, opt, sched, images(torch.float32), mode="reprop",
                               scaler=scaler)
    assert not math.isfinite(out["grad_norm"]) and scaler.get_scale() < 2.0 ** 40
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eval_step_sums_and_padding():
    model = vit()
    model.train()
    x, y = images(n=4)
    full = eval_step(model, (x, y), torch.ones(4))
    half = eval_step(model, (x, y), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    first = eval_step(model, (x[:2], y[:2]), torch.ones(2))
    assert model.training and full["count"] == 4 and half["count"] == 2
    assert half["loss_sum"] == pytest.approx(first["loss_sum"], rel=1e-12)
    assert half["correct"] == first["correct"]
    with torch.no_grad():
        logits = model(x)
    want = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    assert full["loss_sum"] == pytest.approx(float(want), rel=1e-12)
    assert full["correct"] == float((logits.argmax(-1) == y).sum())
    with pytest.raises(ValueError, match="task"):
        eval_step(model, (x, y), torch.ones(4), task="regression")


def test_quick_start_train_step_still_works():
    model = vit(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_step(model, opt, *images(torch.float32), mode="pareprop")
    assert isinstance(loss, float) and math.isfinite(loss)


def test_adamw_steps_match_revjax_make_optimizer():
    """Same parameters and gradients: make_optimizer's AdamW + schedule (torch) moves the
    weights as revjax.train.make_optimizer (optax) does, decay on the matrix only."""
    jax = pytest.importorskip("jax")
    from revjax.train import make_optimizer as jax_make_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3).double()
    start = layer.weight.detach().clone()
    grads = [(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
             for _ in range(4)]
    with jax.enable_x64(True):
        params = {"w": jax.numpy.asarray(layer.weight.detach().numpy()),
                  "b": jax.numpy.asarray(layer.bias.detach().numpy())}
        tx = jax_make_optimizer(1e-2, 8, warmup_steps=2, weight_decay=0.3, clip_norm=None)
        state = tx.init(params)
        for gw, gb in grads:
            updates, state = tx.update({"w": jax.numpy.asarray(gw.numpy()),
                                        "b": jax.numpy.asarray(gb.numpy())}, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        want_w, want_b = np.array(params["w"]), np.array(params["b"])
    opt, sched = make_optimizer(layer, 1e-2, 8, warmup_steps=2, weight_decay=0.3,
                                clip_norm=None)
    for gw, gb in grads:
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
        sched.step()
    assert rel_err(layer.weight, torch.from_numpy(want_w)) <= 1e-9
    assert rel_err(layer.bias, torch.from_numpy(want_b)) <= 1e-9
    assert rel_err(layer.weight, start) > 1e-3  # the steps moved the weights
