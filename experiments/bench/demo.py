"""The main job (``make demo``): the headline at real size, the speed at a small one.

Memory: Rev-ViT-B and Rev-ViT-L against their standard twins, plain and rematerialised per
layer, at 224 px in float32, and ViT-L at depths 12 and 48 (memory over depth). The jax
memory cells only compile (XLA:CPU's memory analysis of the training loss's gradient
function, nothing runs), so real sizes cost seconds; memory per sample is the slope between
two batch sizes. torch's row (the peak of live bytes over forward and backward, measured on
the CPU allocator) runs the gradient computation, so it is ViT-B at two small batches.
Speed: ViT-S at 64 px, both frameworks, a few timed training steps on the CPU.

Writes the cells, ``report.md`` and the plots into the results folder (atomically, as every
command of the suite) and prints the headline: memory per sample of each method, each
reversible method against remat and the standard twin, in numbers and in words (saying so
where a reversible method is not below remat), memory over depth, and the throughput.
"""

from __future__ import annotations

import os

from experiments.bench import grid, report
from experiments.bench.results import load
from experiments.common import table

METHODS = ["standard", "remat", "reprop", "pareprop"]
# (settings of each memory grid, settings of the speed grid)
DEMO = ([dict(models=["vit-b", "vit-l"], size=224, batches=[2, 4], methods=METHODS),
         dict(models=["vit-l"], size=224, batches=[2, 4], depths=[12, 48], methods=METHODS),
         dict(frameworks=["torch"], models=["vit-b"], size=224, batches=[1, 2],
              methods=METHODS)],
        dict(frameworks=["jax", "torch"], models=["vit-s"], size=64, batches=[4],
             methods=METHODS, warmup=2, reps=5))
SMOKE = ([dict(models=["vit-test"], size=32, batches=[2, 3], methods=METHODS[:3]),
          dict(frameworks=["torch"], models=["vit-test"], size=32, batches=[2, 3],
               methods=METHODS[:3])],
         dict(frameworks=["jax", "torch"], models=["vit-test"], size=32, batches=[2],
              methods=["standard", "reprop"], warmup=1, reps=2))
SHOWN = {"jax CPU": "jax, compiled for XLA:CPU (gradient function + AdamW moments)",
         "torch CPU": "torch, CPU allocator (peak over forward and backward, gradients "
                      "included, + parameters, batch, AdamW moments)"}


def headline(results: str) -> str:
    """The printed summary of the cells in ``results``."""
    cells = load(os.path.join(results, "cells.jsonl"))
    mem = report.memory_table(cells, budget_gib=80.0)
    parts = []
    for where, what in SHOWN.items():
        rows = report.headline_table(mem, where)
        if not rows:
            continue
        cols = [c for c in report._columns(rows) if not c.startswith("max batch")]
        batches = sorted({r["batch"] for r in cells if r["kind"] == "memory"
                          and report._label(r) == where})
        parts.append(f"Training memory per sample (MiB; slope between batch "
                     f"{batches[0]} and {batches[-1]}), {what}:\n\n"
                     f"{table(report._fmt(rows), cols)}\n\n"
                     + "".join(f"  {line}\n" for line in report.headline_lines(rows)))
    depth = [r for r in report.depth_table(mem) if r["where"] == "jax CPU"]
    if depth:
        cols = [c for c in report._columns(depth) if c not in ("where", "dtype")]
        parts.append("Memory per sample over depth (MiB), jax, compiled for XLA:CPU:\n\n"
                     + table(report._fmt(depth), cols) + "\n")
    failed = [r for r in cells if "error" in r]
    if failed:
        parts.append(f"{len(failed)} cell(s) failed: see report.md")
    speed = report.speed_table(cells)
    if speed:
        cols = [c for c in report._columns(speed) if c not in ("depth", "dtype")]
        parts.append("Throughput (samples/s of the training step, median of timed steps; "
                     "CPU):\n\n" + table(report._fmt(speed), cols))
    return "\n".join(parts)


def run(results: str, *, smoke: bool = False) -> int:
    """Measure the demo's cells into ``results`` (resuming: cells already there are kept),
    write the report and print the headline."""
    memory, speed = SMOKE if smoke else DEMO
    for settings in memory:
        grid.run_memory(grid.grid_args(results, **settings))
    grid.run_speed(grid.grid_args(results, **speed))
    _, paths = report.write(results)
    print(headline(results))
    print("\nwrote", *paths)
    return 0
