"""The no-accuracy-drop experiment: every cell of (model, mode, dtype, seed) trained with the
same schedule by the training CLI (``experiments/train/cli.py``), one command, resumable.

    python -m experiments.train.sweep [--out results/train/runs] [--seeds 0 1 2] [--only vit]
    python -m experiments.train.sweep --framework torch --only vit   # the revtorch twins

Cells: on digits (16 px), Rev-ViT (backprop, reprop, pareprop) vs ViT of the same width and
depth, and Rev-Swin vs Swin, in float32 and bfloat16; then masked-LM on the standard
library's docstrings (byte-level), Rev-RoBERTa vs RoBERTa, float32. A cell with a
``summary.json`` is skipped; one with a checkpoint continues from it. Seed 0 of every cell
runs first, so a partial sweep already compares every model. ``python -m
experiments.train.report`` aggregates the results. ``--framework torch`` runs the same cells
with ``revtorch`` (same flags, data, batch order and seeds; cell names start with
``torch_``).
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from experiments.train import cli
from experiments.train.config import FRAMEWORKS

# (family, reversible name, standard name, shared CLI arguments)
VISION = {
    "vit": ("rev-vit-test", "vit-test", ["--img-size", "16", "--patch-size", "4"]),
    "swin": ("rev-swin-test", "swin-test", ["--img-size", "16", "--dim", "32"]),
}
VISION_SCHEDULE = ["--data", "digits", "--steps", "500", "--batch-size", "64", "--lr", "3e-3",
                   "--eval-every", "100", "--ckpt-every", "250"]
MLM = ("rev-roberta-test", "roberta-test",
       ["--data", "stdlib-docstrings", "--dim", "64", "--seq-len", "64", "--steps", "1000",
        "--batch-size", "32", "--lr", "2e-3", "--eval-every", "250", "--ckpt-every", "500"])
MODES = ("backprop", "reprop", "pareprop")
DTYPES = ("float32", "bfloat16")


def cells(seeds, only=None, framework="jax"):
    """(name, argv) of every cell, seed-major."""
    out = []
    prefix, fw = ("", []) if framework == "jax" else (f"{framework}_", ["--framework", framework])
    for seed in seeds:
        for family, (rev, std, extra) in VISION.items():
            if only and family not in only:
                continue
            for dtype in DTYPES:
                for model, mode in [(rev, m) for m in MODES] + [(std, "backprop")]:
                    name = f"{prefix}{model}_{mode}_{dtype}_s{seed}"
                    out.append((name, [*fw, "--model", model, "--mode", mode, "--dtype", dtype,
                                       "--seed", str(seed), *extra, *VISION_SCHEDULE]))
        if not only or "roberta" in only:
            rev, std, args = MLM
            for model, mode in ((rev, "pareprop"), (std, "backprop")):
                name = f"{prefix}{model}_{mode}_float32_s{seed}"
                out.append((name, [*fw, "--model", model, "--mode", mode, "--seed", str(seed),
                                   *args]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/train/runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=("vit", "swin", "roberta"))
    p.add_argument("--framework", default="jax", choices=FRAMEWORKS)
    args = p.parse_args(argv)
    todo = cells(args.seeds, args.only, args.framework)
    bar = tqdm(todo, desc="sweep", dynamic_ncols=True)
    for name, cell_argv in bar:
        out = os.path.join(args.out, name)
        if os.path.exists(os.path.join(out, "summary.json")):
            continue
        bar.set_postfix_str(name)
        resume = os.path.exists(os.path.join(out, "config.json"))
        t = time.time()
        summary = cli.train([*cell_argv, "--out", out, "--no-progress",
                                   *(["--resume"] if resume else [])])
        metric = summary.get("eval_accuracy", summary.get("eval_loss"))
        tqdm.write(f"{name}: {metric:.4f} ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
