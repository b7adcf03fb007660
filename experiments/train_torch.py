"""The ``--framework torch`` path of ``experiments/train.py``: the same flags, data, batch
order and outputs (``config.json``, ``metrics.jsonl``, ``summary.json``) with a
``revtorch.models`` model, ``revtorch.train``'s AdamW + warm-up/cosine schedule and
``torch.save`` checkpoints.

``checkpoints/step_<N>.pt`` hold the config, the step, the data position and the state of the
model, optimizer, scheduler, GradScaler (float16) and torch's RNG (dropout); each is written
to a temporary file and renamed (``os.replace``), the last two are kept. The batch of step s
is a function of (seed, s) (``data.batch_indices``; MLM masking from a generator seeded with
(seed, s)), so ``--resume`` ends with the parameters of an unbroken run, bit for bit on CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import tempfile
import time

import numpy as np

from experiments import data as data_lib
from experiments.common import atomic_write_json
from experiments.train import (ConfigError, TrainingError, _rewrite_metrics,
                               _task, load_dataset, model_overrides)

_CKPT = re.compile(r"^step_(\d{8})\.pt$")


def environment() -> dict:
    """Versions and machine."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}


def _overrides(cfg: dict, dataset: data_lib.Dataset | None) -> dict:
    import torch

    kw: dict = {}
    if cfg["dtype"] in ("bfloat16", "float16"):
        kw["dtype"] = getattr(torch, cfg["dtype"])
    elif cfg["dtype"] == "float64":
        kw["param_dtype"] = torch.float64
    return {**kw, **model_overrides(cfg, dataset)}


def check_config(cfg: dict) -> data_lib.Dataset:
    """Validate model, dataset and settings (the model is built on the meta device);
    returns the dataset."""
    import torch

    import revtorch

    if cfg["model"] not in revtorch.models.names():
        raise ConfigError(f"unknown model {cfg['model']!r}; known: "
                          f"{', '.join(revtorch.models.names())}")
    if cfg["data"] not in data_lib.DATASETS:
        raise data_lib.DataError(f"unknown dataset {cfg['data']!r}; known: "
                                 f"{', '.join(data_lib.DATASETS)}")
    task = _task(cfg["model"])
    if (task == "mlm") != (cfg["data"] in data_lib.TEXT_DATASETS):
        kind = "a text" if task == "mlm" else "an image"
        raise ConfigError(f"model {cfg['model']} needs {kind} dataset, got {cfg['data']!r}")
    if cfg["parallel"] != "none":
        raise ConfigError(f"--parallel {cfg['parallel']} is not supported with --framework "
                          "torch (use --parallel none)")
    for key in ("steps", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    try:
        with torch.device("meta"):
            mc = revtorch.models.build(cfg["model"], mode=cfg["mode"],
                                       **_overrides(cfg, None)).config
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg['model']}: {e}") from None
    return load_dataset(cfg, mc)


def checkpoints(out: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the checkpoints in ``out``, oldest first."""
    d = os.path.join(out, "checkpoints")
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := _CKPT.match(n))]
    return sorted(found)


def _save(path: str, payload: dict) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a corrupt or foreign file)
        raise ConfigError(f"--resume: cannot read checkpoint {path} ({e})") from None


def final_state_dict(out: str) -> dict:
    """The model ``state_dict`` of the latest checkpoint in ``out``."""
    found = checkpoints(out)
    if not found:
        raise FileNotFoundError(f"no torch checkpoints in {out}")
    return _load(found[-1][1])["model"]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (a generator per (seed, purpose, index))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def train(args, cfg: dict, out: str) -> dict:
    """Run the torch path (``cfg`` checked against ``out`` by ``check_resume`` already)."""
    dataset = check_config(cfg)

    import torch
    from tqdm import tqdm

    import revtorch
    from revtorch import mlm
    from revtorch import train as T

    task, mode = _task(cfg["model"]), cfg["mode"]
    torch.manual_seed(cfg["seed"])
    model = revtorch.models.build(cfg["model"], mode=mode, **_overrides(cfg, dataset))
    clip = cfg["clip"] or None
    optimizer, scheduler = T.make_optimizer(
        model, cfg["lr"], cfg["steps"], warmup_steps=cfg["warmup"],
        weight_decay=cfg["weight_decay"], clip_norm=clip)
    scaler = torch.amp.GradScaler("cpu") if cfg["dtype"] == "float16" else None
    in_dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32

    os.makedirs(out, exist_ok=True)
    if not args.resume:
        atomic_write_json(os.path.join(out, "config.json"), cfg)
    ckpt_dir = os.path.join(out, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    start = 0
    found = checkpoints(out)
    if args.resume and found:
        start, path = found[-1]
        ck = _load(path)
        saved = ck.get("config") if isinstance(ck, dict) else None
        if not isinstance(saved, dict) or saved.get("model") != cfg["model"]:
            other = saved.get("model") if isinstance(saved, dict) else None
            raise ConfigError(f"--resume: checkpoint {path} is of model {other!r}, not "
                              f"{cfg['model']!r}")
        if saved != cfg or ck.get("step") != start:
            raise ConfigError(f"--resume: checkpoint {path} does not match this config")
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ConfigError(f"--resume: checkpoint {path} does not fit the model "
                              f"({e})") from None
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["torch"])
    _rewrite_metrics(metrics_path, start)

    per_epoch = len(dataset.train.x) // cfg["batch_size"]

    def make_batch(x, y, seed):
        if task == "classification":
            images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            return images.to(in_dtype), torch.from_numpy(y).long()
        ids = torch.from_numpy(np.asarray(x)).long()
        inputs, labels = mlm.mask_tokens(
            ids, torch.Generator().manual_seed(seed), mask_id=data_lib.MASK_ID,
            vocab_size=data_lib.TEXT_VOCAB, pad_id=data_lib.PAD_ID, prob=cfg["mask_prob"])
        return inputs, labels, ids != data_lib.PAD_ID

    def evaluate() -> dict:
        split, bs = dataset.test, cfg["batch_size"]
        sums: dict = {}
        for i in range(0, len(split.x), bs):
            idx = np.arange(i, i + bs) % len(split.x)
            w = torch.from_numpy((np.arange(i, i + bs) < len(split.x)).astype(np.float32))
            y = None if split.y is None else split.y[idx]
            batch = make_batch(split.x[idx], y, _seed(cfg["seed"], 3, i))
            for k, v in T.eval_step(model, batch, w, task=task, mode=mode).items():
                sums[k] = sums.get(k, 0.0) + v
        res = {"eval_loss": sums["loss_sum"] / max(sums["count"], 1)}
        if task == "classification":
            res["eval_accuracy"] = sums["correct"] / sums["count"]
        return res

    def save(step: int) -> None:
        payload = {"config": cfg, "step": step,
                   "data_position": {"epoch": step // per_epoch,
                                     "batch_in_epoch": step % per_epoch},
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(),
                   "scaler": None if scaler is None else scaler.state_dict(),
                   "rng": {"torch": torch.get_rng_state()}}
        _save(os.path.join(ckpt_dir, f"step_{step:08d}.pt"), payload)
        for _, old in checkpoints(out)[:-2]:
            os.unlink(old)

    model.train()
    t0, steps, last = time.time(), cfg["steps"], {}
    end = steps if args.stop_after is None else min(steps, args.stop_after)
    bar = tqdm(range(start, end), initial=start, total=steps, disable=args.no_progress,
               desc=f"{cfg['model']} {mode or ''} torch".strip(), dynamic_ncols=True)
    with open(metrics_path, "a") as log:
        for s in bar:
            idx = data_lib.batch_indices(len(dataset.train.x), cfg["batch_size"],
                                         cfg["seed"], s)
            y = None if dataset.train.y is None else dataset.train.y[idx]
            batch = make_batch(dataset.train.x[idx], y, _seed(cfg["seed"], 2, s))
            m = T.scheduled_train_step(model, optimizer, scheduler, batch, task=task,
                                       mode=mode, scaler=scaler, clip_norm=clip)
            loss, gnorm = m["loss"], m["grad_norm"]
            # with a GradScaler a non-finite gradient is a skipped step, not a failure
            if not math.isfinite(loss) or (scaler is None and not math.isfinite(gnorm)):
                good = checkpoints(out)
                where = (f"the last good checkpoint (step {good[-1][0]}) is kept in "
                         f"{ckpt_dir}" if good else "no checkpoint was written before it")
                raise TrainingError(f"non-finite loss {loss} (gradient norm {gnorm}) at step "
                                    f"{s + 1}; stopped, {where}")
            rec = {"step": s + 1, "loss": loss, "grad_norm": gnorm,
                   "lr": T.learning_rate(s, cfg["lr"], steps, cfg["warmup"])}
            done = s + 1
            if done % args.eval_every == 0 or done == steps:
                last = evaluate()
                rec.update(last)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in last.items()})
            if done % args.ckpt_every == 0 or done == end:
                save(done)
    bar.close()
    if end < steps:
        return {"status": "stopped", "step": end, "out": out}
    if not last:  # resumed after the last step: evaluate the restored state
        last = evaluate()
    losses = [json.loads(line)["loss"] for line in open(metrics_path)]
    summary = {"status": "done", "config": cfg, "task": task, "framework": "torch",
               "mode": mode or model.mode, "steps": steps, "final_train_loss": losses[-1],
               **last, "train_examples": len(dataset.train.x),
               "test_examples": len(dataset.test.x), "resumed_from": start or None,
               "wall_s_this_process": time.time() - t0,
               "params": int(sum(p.numel() for p in model.parameters())),
               "environment": environment()}
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary


__all__ = ["check_config", "checkpoints", "environment", "final_state_dict", "train"]
