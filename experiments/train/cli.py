"""The training command line: train a ``revjax.models`` model on real data, resumably.

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
outputs (``torch_cli.py``; ``torch.save`` checkpoints ``checkpoints/step_<N>.pt``); with
several processes under torchrun, ``--parallel dp`` (DDP) or ``--parallel fsdp`` (FSDP2):

    torchrun --nproc_per_node=2 -m experiments.train --framework torch --parallel dp ...

Bad input (unknown model or dataset, missing or malformed data, images that do not fit the
model, a checkpoint of another config) stops before anything is written. A non-finite loss
stops the run, names the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from experiments.train import data as data_lib
from experiments.train import jax_cli, torch_cli
from experiments.train.config import (CONFIG_KEYS, DTYPES, FRAMEWORKS, PARALLEL, ConfigError,
                                      TrainingError)


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
                   "model's: reprop for reversible models, backprop for standard ones)")
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


def train(argv: Sequence[str] | None = None) -> dict:
    """Run the CLI; returns the summary (or ``{"status": "stopped", ...}`` with
    ``--stop-after``). Raises ``DataError`` / ``ConfigError`` / ``TrainingError``."""
    args = parser().parse_args(argv)
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    if cfg["data_path"]:
        cfg["data_path"] = os.path.abspath(cfg["data_path"])
    out = os.path.abspath(args.out)
    if cfg["framework"] == "torch":  # checks the resume itself, on every process
        return torch_cli.train(args, cfg, out)
    return jax_cli.train(args, cfg, out)


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
