"""revjax.train: the optimizer factory, the compiled train/eval steps (classification and
MLM, every mode, bfloat16 compute) and data-parallel / FSDP sharding on 8 host devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import revjax
from revjax import mlm, train as T

VIT = dict(img_size=16, patch_size=4)


def test_optimizer_warms_up_linearly_then_decays_by_a_cosine_and_clips():
    tx = T.make_optimizer(1e-2, 100, warmup_steps=10, weight_decay=0.0, clip_norm=1.0)
    assert T.learning_rate(0, 1e-2, 100, 10) == 0.0
    assert T.learning_rate(5, 1e-2, 100, 10) == pytest.approx(5e-3)
    assert T.learning_rate(10, 1e-2, 100, 10) == pytest.approx(1e-2)
    assert T.learning_rate(55, 1e-2, 100, 10) == pytest.approx(5e-3, rel=1e-5)
    assert T.learning_rate(100, 1e-2, 100, 10) == pytest.approx(0.0, abs=1e-9)
    # clipping before Adam: a huge gradient then a unit one in the opposite direction. Clipped
    # to norm 1, the second dominates Adam's first moment (0.09 u - 0.1 u < 0, so the
    # update follows +u); unclipped, the first does (the update follows -u).
    u = jnp.ones(3) / jnp.sqrt(3.0)
    second = {}
    for clip in (1.0, None):
        tx = T.make_optimizer(1.0, 100, warmup_steps=0, weight_decay=0.0, clip_norm=clip)
        params = {"w": jnp.zeros(3)}
        state = tx.init(params)
        for g in (1e6 * u, -u):
            upd, state = tx.update({"w": g}, state, params)
        second[clip] = upd["w"]
    assert bool((second[1.0] > 0).all()) and bool((second[None] < 0).all()), second
    with pytest.raises(ValueError, match="warmup_steps"):
        T.make_optimizer(1e-3, 10, warmup_steps=10)


def test_weight_decay_skips_vectors():
    tx = T.make_optimizer(1.0, 10, warmup_steps=0, weight_decay=0.5, clip_norm=None)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(upd["b"]).max()) == 0.0
    assert float(jnp.abs(upd["w"]).max()) > 0.0


def _vit(mode, dtype=None, seed=0):
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(seed), mode=mode, dtype=dtype,
                                **VIT)
    opt = T.create_optimizer(model, T.make_optimizer(3e-3, 20, warmup_steps=1))
    return model, opt


def _images(n=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 16, 16, 3)), jax.random.randint(k2, (n,), 0, 10)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_train_and_eval_steps_agree_across_modes_and_learn(dtype):
    x, y = _images()
    losses, params = {}, {}
    for mode in revjax.MODES:
        model, opt = _vit(mode, dtype)
        graphdef, state = nnx.split((model, opt))
        step = T.make_train_step(graphdef, mode=mode)
        run = []
        for _ in range(4):
            state, m = step(state, (x, y), None)
            run.append(float(m["loss"]))
        losses[mode] = run
        model, _ = nnx.merge(graphdef, state)
        params[mode] = nnx.state(model, nnx.Param)
        assert jax.tree.leaves(params[mode])[0].dtype == jnp.float32  # float32 parameters
        ev = T.make_eval_step(graphdef, mode=mode)(state, (x, y), jnp.ones(8).at[-1].set(0))
        assert float(ev["count"]) == 7.0 and 0 <= float(ev["correct"]) <= 7
    assert losses["backprop"][-1] < losses["backprop"][0]
    tol = 1e-4 if dtype is None else 3e-2
    for mode in ("reprop", "pareprop"):
        np.testing.assert_allclose(losses[mode], losses["backprop"], rtol=tol)


def test_quick_start_train_step_updates_model_and_optimizer_in_place():
    model, opt = _vit("pareprop")
    x, y = _images()
    losses = [float(T.train_step(model, opt, x, y)) for _ in range(4)]
    assert int(opt.step[...]) == 4
    assert losses[-1] < losses[0]
    # the other backward on the same model: the same next loss up to float32 rounding
    model2, opt2 = nnx.clone((model, opt))
    a = float(T.train_step(model, opt, x, y, mode="reprop"))
    b = float(T.train_step(model2, opt2, x, y, mode="backprop"))
    assert a == pytest.approx(b, rel=1e-5)


def test_mlm_train_step_learns_in_every_mode():
    ids = jax.random.randint(jax.random.key(0), (4, 12), 2, 40)
    inputs, labels = mlm.mask_tokens(ids, jax.random.key(1), mask_id=0, vocab_size=40,
                                     pad_id=1, prob=0.3)
    first = {}
    for mode in revjax.MODES:
        model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0), mode=mode,
                                    vocab_size=40)
        opt = T.create_optimizer(model, T.make_optimizer(3e-3, 10, warmup_steps=1))
        graphdef, state = nnx.split((model, opt))
        step = T.make_train_step(graphdef, task="mlm", mode=mode)
        run = []
        for _ in range(4):
            state, m = step(state, (inputs, labels, None), None)
            run.append(float(m["loss"]))
        assert run[-1] < run[0]
        first[mode] = run
        ev = T.make_eval_step(graphdef, task="mlm", mode=mode)(
            state, (inputs, labels, None), jnp.ones(4))
        assert float(ev["count"]) == float((labels != mlm.IGNORE).sum())
    for mode in ("reprop", "pareprop"):
        np.testing.assert_allclose(first[mode], first["backprop"], rtol=1e-4)
    with pytest.raises(ValueError, match="task must be one of"):
        T.make_train_step(graphdef, task="detection")


def test_steps_compile_with_the_cpu_options_on_cpu():
    """The library's step carries pareprop's residuals without XLA's per-step copies: its
    compiled program has fewer copies than the same step with region analysis turned off."""
    assert jax.default_backend() == "cpu"
    assert T.compiler_options() == revjax.CPU_COMPILER_OPTIONS
    model, opt = _vit("pareprop")
    graphdef, state = nnx.split((model, opt))
    lowered = T.make_train_step(graphdef, mode="pareprop").lower(state, _images(), None)
    off = {k: False for k in revjax.CPU_COMPILER_OPTIONS}
    copies = [c.as_text().count(" copy(") for c in (lowered.compile(),
                                                   lowered.compile(compiler_options=off))]
    assert copies[0] < copies[1], copies


# --------------------------------------------------------------- 8 host devices

_MULTI = r'''
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import revjax
from revjax import train as T
from jax.sharding import AxisType

assert jax.device_count() == 8 and jax.config.jax_enable_x64
out = {"grads": {}, "steps": {}, "memory": {}}

def rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    num = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(la, lb))
    den = max(float(np.abs(np.asarray(y)).max()) for y in lb)
    return num / den

def build(name, mode, **kw):
    return revjax.models.build(name, rngs=nnx.Rngs(0), mode=mode, param_dtype=jnp.float64,
                               **kw)

def grad_fn(graphdef, task, mode, sh):
    def f(params, batch):
        model = nnx.merge(graphdef, params)
        return nnx.value_and_grad(lambda m: T.compute_loss(m, batch, task=task, mode=mode))(model)
    if sh is None:
        return jax.jit(f)
    return jax.jit(f, in_shardings=(sh.state, (sh.batch,) * len(batch)))

mesh = T.make_mesh(8)
k1, k2 = jax.random.split(jax.random.key(0))
x = jax.random.normal(k1, (8, 16, 16, 3), jnp.float64)
y = jax.random.randint(k2, (8,), 0, 10)
cases = [("rev-vit-test", "classification", m, (x, y), dict(img_size=16, patch_size=4))
         for m in revjax.MODES]
ids = jax.random.randint(k1, (8, 12), 2, 100)
cases.append(("rev-roberta-test", "mlm", "pareprop",
              (ids, jnp.where(ids % 3 == 0, ids, -100), None), {}))
for name, task, mode, batch, kw in cases:
    model = build(name, mode, **kw)
    graphdef, params = nnx.split(model)
    ref_loss, ref_g = grad_fn(graphdef, task, mode, None)(params, batch)
    for kind in ("dp", "fsdp"):
        sh = (T.fsdp if kind == "fsdp" else T.data_parallel)(params, mesh)
        b = tuple(None if a is None else jax.device_put(a, sh.batch) for a in batch)
        loss, g = grad_fn(graphdef, task, mode, sh)(jax.device_put(params, sh.state), b)
        out["grads"][f"{name} {mode} {kind}"] = {
            "loss": abs(float(loss - ref_loss)) / abs(float(ref_loss)), "grads": rel(g, ref_g)}

# the library's train step (SGD, so one step's update is lr * gradient), and its memory
model = build("rev-vit-test", "pareprop", img_size=16, patch_size=4, dim=64)
opt = T.create_optimizer(model, optax.sgd(0.1))
graphdef, state = nnx.split((model, opt))
ref_state, ref_m = T.make_train_step(graphdef, mode="pareprop")(state, (x, y), None)
for kind in ("dp", "fsdp"):
    sh = (T.fsdp if kind == "fsdp" else T.data_parallel)(state, mesh)
    step = T.make_train_step(graphdef, mode="pareprop", shardings=sh)
    args = (jax.device_put(state, sh.state), jax.device_put((x, y), (sh.batch, sh.batch)),
            None)
    new, m = step(*args)
    kernel = new[0]["blocks"]["f"]["attn"]["qkv"]["kernel"][...]
    out["steps"][kind] = {"params": rel(new, ref_state),
                          "loss": abs(float(m["loss"] - ref_m["loss"])) / float(ref_m["loss"]),
                          "kernel_shards": len({str(s.index) for s in kernel.addressable_shards})}
    mem = step.lower(*args).compile().memory_analysis()
    out["memory"][kind] = {k: int(getattr(mem, k + "_size_in_bytes")) for k in
                           ("argument", "output", "temp", "alias")}

# an explicit mesh: the same step (its body under auto_axes), DP and FSDP
explicit = T.make_mesh(8, axis_type=AxisType.Explicit)
for kind in ("dp", "fsdp"):
    sh = (T.fsdp if kind == "fsdp" else T.data_parallel)(state, explicit)
    step = T.make_train_step(graphdef, mode="pareprop", shardings=sh)
    new, m = step(jax.device_put(state, sh.state),
                  jax.device_put((x, y), (sh.batch, sh.batch)), None)
    ev = T.make_eval_step(graphdef, mode="pareprop", shardings=sh)(
        new, jax.device_put((x, y), (sh.batch, sh.batch)), jax.device_put(jnp.ones(8), sh.batch))
    out["steps"]["explicit " + kind] = {"params": rel(new, ref_state),
                                        "loss": abs(float(m["loss"] - ref_m["loss"])) / float(ref_m["loss"]),
                                        "eval_count": float(ev["count"])}
# the CLI: FSDP over 8 devices ends where one device does (float64, 3 AdamW steps)
import tempfile
from experiments.train import cli, jax_cli
with tempfile.TemporaryDirectory() as tmp:
    argv = ["--model", "rev-vit-test", "--data", "digits", "--img-size", "8", "--patch-size",
            "4", "--batch-size", "16", "--steps", "3", "--dtype", "float64", "--no-progress"]
    one = cli.train(argv + ["--out", tmp + "/one"])
    many = cli.train(argv + ["--out", tmp + "/fsdp", "--parallel", "fsdp", "--devices", "8"])
    out["cli_fsdp"] = {"params": rel(jax_cli.final_params(tmp + "/fsdp"),
                                     jax_cli.final_params(tmp + "/one")),
                       "eval_loss": abs(one["eval_loss"] - many["eval_loss"]) / one["eval_loss"]}
try:
    T.data_parallel(state, T.make_mesh(8, axis_type=AxisType.Manual))
    out["manual_error"] = None
except ValueError as e:
    out["manual_error"] = str(e)
print("RESULT " + json.dumps(out))
'''


def test_data_parallel_and_fsdp_on_8_devices_match_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8").strip())
    proc = subprocess.run([sys.executable, "-c", _MULTI], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(out, indent=1))
    assert len(out["grads"]) == 8
    for case, errs in out["grads"].items():
        assert errs["loss"] <= 1e-9 and errs["grads"] <= 1e-9, (case, errs)
    for kind, res in out["steps"].items():
        assert res["params"] <= 1e-9 and res["loss"] <= 1e-9, (kind, res)
    assert out["steps"]["dp"]["kernel_shards"] == 1  # replicated: every device holds it all
    assert out["steps"]["fsdp"]["kernel_shards"] == 8
    per_device = {k: m["argument"] + m["output"] + m["temp"] - m["alias"]
                  for k, m in out["memory"].items()}
    assert per_device["fsdp"] < per_device["dp"], out["memory"]
    assert out["memory"]["fsdp"]["argument"] < out["memory"]["dp"]["argument"] / 2
    assert out["steps"]["explicit fsdp"]["eval_count"] == 8.0
    assert out["cli_fsdp"]["params"] <= 1e-9 and out["cli_fsdp"]["eval_loss"] <= 1e-9
    assert "AxisType.Manual" in out["manual_error"], out["manual_error"]


@pytest.mark.parametrize("name", ["rev-vit-test", "vit-test", "rev-swin-test"])
def test_weight_decay_skips_biases_and_norm_scales_of_stacked_layers(name):
    """With zero gradients one AdamW step is pure weight decay: matrices shrink by
    ``lr * wd``, biases and norm scales (per layer 1-D, stacked 2-D) stay as they were."""
    model = revjax.models.build(name, rngs=nnx.Rngs(0))
    tx = T.make_optimizer(0.1, total_steps=10, warmup_steps=0, weight_decay=0.5,
                              clip_norm=None)
    optimizer = T.create_optimizer(model, tx)
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(lambda x: np.array(x), before)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.state(model, nnx.Param)
    decayed = kept = 0
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(before),
                                 jax.tree_util.tree_leaves_with_path(after)):
        leaf = jax.tree_util.keystr(path)
        if any(k in leaf for k in ("['bias']", "['scale']")):
            np.testing.assert_array_equal(np.asarray(b), a, err_msg=leaf)
            kept += 1
        else:
            np.testing.assert_allclose(np.asarray(b), a * (1 - 0.1 * 0.5), rtol=1e-6,
                                       err_msg=leaf)
            decayed += 1
    assert decayed and kept


@pytest.mark.parametrize("warmup, end", [(3, 0.0), (0, 1e-4), (1, 0.0)])
def test_schedule_is_optax_warmup_cosine_and_float64_under_x64(warmup, end):
    ref = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, 20, end)
    ours = T._schedule(2e-3, 20, warmup, end)
    for step in range(0, 23):
        np.testing.assert_allclose(float(ours(step)), float(ref(step)), rtol=1e-6, atol=1e-12)
    with jax.enable_x64(True):
        assert ours(jnp.asarray(5)).dtype == jnp.float64
