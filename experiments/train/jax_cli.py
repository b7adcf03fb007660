"""The jax path of the training CLI (``--framework jax``, the default): a ``revjax.models``
model, ``revjax.train``'s AdamW + warm-up/cosine schedule and jitted steps, orbax checkpoints
(``checkpoints/``: model, optimizer and data position, written atomically, the last two
kept), data-parallel or FSDP shardings over the devices (``--parallel dp|fsdp``)."""

from __future__ import annotations

import json
import math
import os
import platform
import time

import numpy as np

from experiments.common import atomic_write_json
from experiments.train import data as data_lib
from experiments.train.config import (ConfigError, TrainingError, check_resume, load_dataset,
                                      model_overrides, rewrite_metrics, task_of)


def environment() -> dict:
    """Versions and machine."""
    import flax
    import jax
    import jaxlib
    import optax
    import orbax.checkpoint as ocp

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax_checkpoint": ocp.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def _overrides(cfg: dict, dataset: data_lib.Dataset | None) -> dict:
    import jax.numpy as jnp

    kw: dict = {"dtype": None if cfg["dtype"] == "float32" else getattr(jnp, cfg["dtype"])}
    if cfg["dtype"] == "float64":
        kw["param_dtype"] = jnp.float64
    return {**kw, **model_overrides(cfg, dataset)}


def check_config(cfg: dict):
    """Validate model, dataset, dtype and devices; returns (abstract model, dataset)."""
    import jax
    from flax import nnx

    import revjax

    if cfg["model"] not in revjax.models.names():
        raise ConfigError(f"unknown model {cfg['model']!r}; known: "
                          f"{', '.join(revjax.models.names())}")
    if cfg["data"] not in data_lib.DATASETS:
        raise data_lib.DataError(f"unknown dataset {cfg['data']!r}; known: "
                                 f"{', '.join(data_lib.DATASETS)}")
    task = task_of(cfg["model"])
    text = cfg["data"] in data_lib.TEXT_DATASETS
    if (task == "mlm") != text:
        kind = "a text" if task == "mlm" else "an image"
        raise ConfigError(f"model {cfg['model']} needs {kind} dataset, got {cfg['data']!r}")
    if cfg["dtype"] == "float16":
        raise ConfigError("--dtype float16 is for --framework torch (with a GradScaler); "
                          "use bfloat16 with jax")
    if cfg["dtype"] == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("--dtype float64 needs JAX_ENABLE_X64=1")
    for key in ("steps", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    if cfg["parallel"] != "none":
        n = cfg["devices"] or jax.device_count()
        if n > jax.device_count():
            raise ConfigError(f"--devices {n} but only {jax.device_count()} are visible")
        if cfg["batch_size"] % n:
            raise ConfigError(f"--batch-size {cfg['batch_size']} is not divisible by the "
                              f"{n} devices of the mesh")
    try:
        abstract = nnx.eval_shape(lambda: revjax.models.build(
            cfg["model"], rngs=nnx.Rngs(0), mode=cfg["mode"], **_overrides(cfg, None)))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg['model']}: {e}") from None
    return abstract, load_dataset(cfg, abstract.config)


def _mesh_shardings(cfg, state):
    import jax

    from revjax import train

    if cfg["parallel"] == "none":
        return None
    mesh = train.make_mesh(cfg["devices"] or jax.device_count())
    return (train.fsdp if cfg["parallel"] == "fsdp" else train.data_parallel)(state, mesh)


def train(args, cfg: dict, out: str) -> dict:
    """Run the jax path of the CLI (``cli.train`` parsed ``args`` into ``cfg``; ``out`` is
    absolute); returns the summary, or ``{"status": "stopped", ...}`` with ``--stop-after``.
    Raises ``DataError`` / ``ConfigError`` / ``TrainingError``."""
    check_resume(cfg, out, args.resume)
    abstract, dataset = check_config(cfg)

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx
    from tqdm import tqdm

    import revjax
    from revjax import mlm, train as T

    task = task_of(cfg["model"])
    mode = cfg["mode"]
    model = revjax.models.build(cfg["model"], rngs=nnx.Rngs(cfg["seed"]), mode=mode,
                                **_overrides(cfg, dataset))
    tx = T.make_optimizer(cfg["lr"], cfg["steps"], warmup_steps=cfg["warmup"],
                          weight_decay=cfg["weight_decay"], clip_norm=cfg["clip"] or None)
    optimizer = T.create_optimizer(model, tx)
    graphdef, state = nnx.split((model, optimizer))
    shardings = _mesh_shardings(cfg, state)
    if shardings is not None:
        state = T.put(state, shardings.state)
    step_fn = T.make_train_step(graphdef, task=task, mode=mode, shardings=shardings)
    eval_fn = T.make_eval_step(graphdef, task=task, mode=mode, shardings=shardings)

    os.makedirs(out, exist_ok=True)
    if not args.resume:
        atomic_write_json(os.path.join(out, "config.json"), cfg)
    ckpt_dir = os.path.join(out, "checkpoints")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=False))
    start = 0
    metrics_path = os.path.join(out, "metrics.jsonl")
    if args.resume and manager.latest_step() is not None:
        start = manager.latest_step()
        abstract_state = jax.tree.map(
            lambda x, s=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            state)
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        if meta.get("config") != cfg or meta.get("step") != start:
            raise ConfigError(f"--resume: checkpoint {start} in {ckpt_dir} does not match "
                              "this config")
    rewrite_metrics(metrics_path, start)

    base = jax.random.key(cfg["seed"])
    k_dropout, k_mask, k_eval = (jax.random.fold_in(base, i) for i in (1, 2, 3))
    mask_fn = jax.jit(lambda ids, key: mlm.mask_tokens(
        ids, key, mask_id=data_lib.MASK_ID, vocab_size=data_lib.TEXT_VOCAB,
        pad_id=data_lib.PAD_ID, prob=cfg["mask_prob"]))
    put_batch = (lambda b: b) if shardings is None else (
        lambda b: T.put(b, (shardings.batch,) * len(b)))
    in_dtype = jnp.float64 if cfg["dtype"] == "float64" else jnp.float32

    def make_batch(x, y, key_step):
        if task == "classification":
            return put_batch((jnp.asarray(x, in_dtype), jnp.asarray(y)))
        inputs, labels = mask_fn(jnp.asarray(x), key_step)
        return put_batch((inputs, labels, jnp.asarray(x != data_lib.PAD_ID)))

    def evaluate(state) -> dict:
        split, bs = dataset.test, cfg["batch_size"]
        sums: dict = {}
        for i in range(0, len(split.x), bs):
            idx = np.arange(i, i + bs) % len(split.x)
            w = (np.arange(i, i + bs) < len(split.x)).astype(np.float32)
            y = None if split.y is None else split.y[idx]
            batch = make_batch(split.x[idx], y, jax.random.fold_in(k_eval, i))
            w = jnp.asarray(w) if shardings is None else T.put(jnp.asarray(w), shardings.batch)
            for k, v in eval_fn(state, batch, w).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        res = {"eval_loss": sums["loss_sum"] / max(sums["count"], 1)}
        if task == "classification":
            res["eval_accuracy"] = sums["correct"] / sums["count"]
        return res

    def save(step: int, state) -> None:
        meta = {"config": cfg, "step": step, "data_position": {
            "epoch": step // (len(dataset.train.x) // cfg["batch_size"]),
            "batch_in_epoch": step % (len(dataset.train.x) // cfg["batch_size"])}}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

    t0, steps, last = time.time(), cfg["steps"], {}
    end = steps if args.stop_after is None else min(steps, args.stop_after)
    bar = tqdm(range(start, end), initial=start, total=steps, disable=args.no_progress,
               desc=f"{cfg['model']} {mode or ''}".strip(), dynamic_ncols=True)
    with open(metrics_path, "a") as log:
        for s in bar:
            idx = data_lib.batch_indices(len(dataset.train.x), cfg["batch_size"],
                                         cfg["seed"], s)
            y = None if dataset.train.y is None else dataset.train.y[idx]
            batch = make_batch(dataset.train.x[idx], y, jax.random.fold_in(k_mask, s))
            new_state, m = step_fn(state, batch, jax.random.fold_in(k_dropout, s))
            loss, gnorm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                manager.wait_until_finished()
                good = manager.latest_step()
                where = (f"the last good checkpoint (step {good}) is kept in {ckpt_dir}"
                         if good is not None else "no checkpoint was written before it")
                raise TrainingError(f"non-finite loss {loss} (gradient norm {gnorm}) at step "
                                    f"{s + 1}; stopped, {where}")
            state = new_state
            rec = {"step": s + 1, "loss": loss, "grad_norm": gnorm,
                   "lr": T.learning_rate(s, cfg["lr"], steps, cfg["warmup"])}
            done = s + 1
            if done % args.eval_every == 0 or done == steps:
                last = evaluate(state)
                rec.update(last)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in last.items()})
            if done % args.ckpt_every == 0 or done == end:
                save(done, state)
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if end < steps:
        return {"status": "stopped", "step": end, "out": out}
    if not last:  # resumed after the last step: evaluate the restored state
        last = evaluate(state)
    losses = [json.loads(line)["loss"] for line in open(metrics_path)]
    summary = {"status": "done", "config": cfg, "task": task,
               "mode": mode or model.mode, "steps": steps, "final_train_loss": losses[-1],
               **last, "train_examples": len(dataset.train.x),
               "test_examples": len(dataset.test.x), "resumed_from": start or None,
               "wall_s_this_process": time.time() - t0,
               "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
               "environment": environment()}
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


def final_params(out: str):
    """The parameters of the latest checkpoint in ``out`` (a pytree of numpy arrays)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(out, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
        step = mgr.latest_step()
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    return restored["state"]
