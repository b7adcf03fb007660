"""Train a ``revjax.models`` model on real data, resumably.

    python -m experiments.train --model rev-vit-test --data digits --img-size 16 \
        --patch-size 4 --mode pareprop --steps 300 --out runs/vit

Image classification on ``digits`` (scikit-learn, shipped), ``cifar10`` (python-pickle
directory, ``--data-path``) or ``npz`` (``images``, ``labels``; ``--data-path``), and
masked-LM on ``stdlib-docstrings`` (byte-level tokens) for the RoBERTa family.

Writes into ``--out``: ``config.json`` (the run's settings), ``metrics.jsonl`` (a line per
step: loss, gradient norm, learning rate; a line per evaluation), ``checkpoints/`` (orbax
``CheckpointManager``: model, optimizer and data position, written atomically, the last two
kept) and at the end ``summary.json`` (config, final metrics, versions, machine). A killed
run continues with ``--resume`` and ends with the parameters of an unbroken run, bit for
bit on CPU: the batch of step s and its keys are pure functions of (seed, s).

``--framework torch`` trains the ``revtorch.models`` twin with the same flags, data and
outputs (``experiments/train_torch.py``; ``torch.save`` checkpoints ``checkpoints/step_<N>.pt``);
with several processes under torchrun, ``--parallel dp`` (DDP) or ``--parallel fsdp`` (FSDP2):

    torchrun --nproc_per_node=2 -m experiments.train --framework torch --parallel dp ...

Bad input (unknown model or dataset, missing or malformed data, images that do not fit the
model, a checkpoint of another config) stops before anything is written. A non-finite loss
stops the run, names the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Sequence

import numpy as np

if not __package__:  # run as a script (torchrun experiments/train.py): the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import data as data_lib
from experiments.common import atomic_write_json

# Settings that define a run (a checkpoint of a run with other values cannot be resumed).
CONFIG_KEYS = ("model", "data", "data_path", "img_size", "patch_size", "depth", "dim", "mode",
               "dtype", "steps", "batch_size", "lr", "warmup", "weight_decay", "clip",
               "seed", "seq_len", "mask_prob", "drop_rate", "parallel", "devices",
               "framework")
DTYPES = ("float32", "bfloat16", "float64", "float16")
FRAMEWORKS = ("jax", "torch")
PARALLEL = ("none", "dp", "fsdp")


class ConfigError(ValueError):
    """A setting that cannot work (model, sizes, devices, resume)."""


class TrainingError(RuntimeError):
    """Training went wrong (a non-finite loss)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a revjax.models (revtorch.models) name")
    p.add_argument("--framework", default="jax", choices=FRAMEWORKS,
                   help="jax (revjax, orbax checkpoints) or torch (revtorch, torch.save "
                   "checkpoints; --parallel dp/fsdp under torchrun)")
    p.add_argument("--data", required=True, help=f"one of {', '.join(data_lib.DATASETS)}")
    p.add_argument("--data-path", help="cifar10: directory; npz: file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", default=None, help="backprop, reprop or pareprop (default: the "
                   "model's: pareprop for reversible models, backprop for standard ones)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype (parameters stay float32; float64 needs JAX_ENABLE_X64; "
                   "float16: torch only, with a GradScaler)")
    p.add_argument("--img-size", type=int, help="model image size (digits are resized to it)")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--dim", type=int, help="model width (Swin: of the first stage)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="global-norm clip (0: none)")
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=64, help="MLM tokens per row")
    p.add_argument("--mask-prob", type=float, default=0.15)
    p.add_argument("--parallel", default="none", choices=PARALLEL,
                   help="dp: batch over devices; fsdp: parameters and optimizer state too "
                   "(torch: DDP / FSDP2, one process per device under torchrun)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices of the mesh (all; torch: torchrun's processes)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (as if killed) after this many steps, with a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


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


# ------------------------------------------------------------------------ checking


def _task(model_name: str) -> str:
    return "mlm" if "roberta" in model_name else "classification"


def model_overrides(cfg: dict, dataset: data_lib.Dataset | None) -> dict:
    """The model overrides a run's config asks for, apart from dtypes (the same keys in
    both frameworks; each adds its own dtype objects)."""
    kw: dict = {}
    if cfg["drop_rate"]:
        kw["drop_rate"] = cfg["drop_rate"]
    for key in ("depth", "dim"):
        if cfg[key] is not None:
            kw[key] = cfg[key]
    if _task(cfg["model"]) == "mlm":
        kw.update(vocab_size=data_lib.TEXT_VOCAB, pad_id=data_lib.PAD_ID, max_len=cfg["seq_len"])
        return kw
    for key in ("img_size", "patch_size"):
        if cfg[key] is not None:
            kw[key] = cfg[key]
    if dataset is not None:
        kw["num_classes"] = dataset.num_classes
    return kw


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
    task = _task(cfg["model"])
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


def load_dataset(cfg: dict, mc) -> data_lib.Dataset:
    """The run's dataset, checked against the model config ``mc`` (image size and channels)
    and the batch size (either framework)."""
    if _task(cfg["model"]) == "mlm":
        dataset = data_lib.load(cfg["data"], length=cfg["seq_len"])
    else:
        dataset = data_lib.load(cfg["data"], path=cfg["data_path"], img_size=mc.img_size,
                                channels=mc.in_chans)
        want = (mc.img_size, mc.img_size, mc.in_chans)
        if dataset.image_shape != want:
            h, w, c = dataset.image_shape
            raise data_lib.DataError(
                f"{cfg['data']} images are {h}x{w} with {c} channel(s), but model "
                f"{cfg['model']} expects {want[0]}x{want[1]} with {want[2]} channel(s); "
                f"pass --img-size {h} for square images or convert the data")
    n_train = len(dataset.train.x)
    if n_train < cfg["batch_size"]:
        raise ConfigError(f"--batch-size {cfg['batch_size']} exceeds the {n_train} training "
                          "examples")
    return dataset


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_resume(cfg: dict, out: str, resume: bool) -> None:
    """A fresh run needs an empty --out; --resume needs a run of the same config there."""
    saved = _read_json(os.path.join(out, "config.json"))
    has_ckpt = os.path.isdir(os.path.join(out, "checkpoints"))
    if not resume:
        if saved is not None or has_ckpt:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
        return
    if saved is None:
        raise ConfigError(f"--resume: {out} holds no run (no config.json)")
    defaults = {"framework": "jax"}  # runs from before --framework existed
    diff = {k: (saved.get(k, defaults.get(k)), cfg[k]) for k in CONFIG_KEYS
            if saved.get(k, defaults.get(k)) != cfg[k]}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"--resume: the checkpoint in {out} is from another model or "
                          f"config ({pretty})")


# ---------------------------------------------------------------------------- run


def _mesh_shardings(cfg, state):
    import jax

    from revjax import train

    if cfg["parallel"] == "none":
        return None
    mesh = train.make_mesh(cfg["devices"] or jax.device_count())
    return (train.fsdp if cfg["parallel"] == "fsdp" else train.data_parallel)(state, mesh)


def _rewrite_metrics(path: str, upto: int) -> None:
    """Keep the well-formed lines of steps <= ``upto`` (after a kill), atomically."""
    keep = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", math.inf) <= upto:
                    keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def train(argv: Sequence[str] | None = None) -> dict:
    """Run the CLI; returns the summary (or ``{"status": "stopped", ...}`` with
    ``--stop-after``). Raises ``DataError`` / ``ConfigError`` / ``TrainingError``."""
    args = parser().parse_args(argv)
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    if cfg["data_path"]:
        cfg["data_path"] = os.path.abspath(cfg["data_path"])
    out = os.path.abspath(args.out)
    if cfg["framework"] == "torch":  # checks the resume itself, on every process
        from experiments import train_torch

        return train_torch.train(args, cfg, out)
    check_resume(cfg, out, args.resume)
    abstract, dataset = check_config(cfg)

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx
    from tqdm import tqdm

    import revjax
    from revjax import mlm, train as T

    task = _task(cfg["model"])
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
    _rewrite_metrics(metrics_path, start)

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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        summary = train(argv)
    except (data_lib.DataError, ConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("status", "step", "eval_accuracy", "eval_loss", "final_train_loss")
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def _leave(rc: int) -> None:
    """Exit; a torch run under torchrun leaves through ``train_torch.leave``."""
    if "experiments.train_torch" in sys.modules:
        sys.modules["experiments.train_torch"].leave(rc)
    sys.exit(rc)


if __name__ == "__main__":
    if not __package__:  # one copy of this module (and of ConfigError) for the torch path
        from experiments import train as _module

        _module._leave(_module.main())
    _leave(main())
