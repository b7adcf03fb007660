"""The training CLI's settings and the checks both frameworks' loops share: what defines a
run (``CONFIG_KEYS``), its errors, the model overrides, the data set against the model, the
resume check and the metrics file after a kill."""

from __future__ import annotations

import json
import math
import os

from experiments.train import data as data_lib

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


def task_of(model_name: str) -> str:
    """The task of a model: masked LM for the RoBERTa family, else classification."""
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
    if task_of(cfg["model"]) == "mlm":
        kw.update(vocab_size=data_lib.TEXT_VOCAB, pad_id=data_lib.PAD_ID, max_len=cfg["seq_len"])
        return kw
    for key in ("img_size", "patch_size"):
        if cfg[key] is not None:
            kw[key] = cfg[key]
    if dataset is not None:
        kw["num_classes"] = dataset.num_classes
    return kw


def load_dataset(cfg: dict, mc) -> data_lib.Dataset:
    """The run's dataset, checked against the model config ``mc`` (image size and channels)
    and the batch size (either framework)."""
    if task_of(cfg["model"]) == "mlm":
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


def rewrite_metrics(path: str, upto: int) -> None:
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
