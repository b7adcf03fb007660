"""The benchmark suite: training memory, largest batch and throughput of every backward mode,
next to the standard twin and the rematerialised baselines a user would pick instead, in
JAX and PyTorch; the rebuild-drift numerics; the tables and plots.

    python -m experiments.bench demo                  # the main job (`make demo`), ~2 min CPU
    python -m experiments.bench memory --models vit-b vit-l --batches 2 6 --size 224
    python -m experiments.bench memory --models vit-l --depths 12 24 48 --batches 2
    python -m experiments.bench memory --backend gpu-compile ...   # XLA:GPU (H200), no GPU
    python -m experiments.bench speed --models vit-b swin-t --batches 2 4 --frameworks jax torch
    python -m experiments.bench report                # tables (markdown) + plots (PNG)
    python -m experiments.bench numerics ...          # rebuild drift per dtype (a probe)
    python -m experiments.bench {overlap,gpu-compile,parity,profile,...} ...  # see --help

A model is named by its family variant (``vit-b``, ``swin-t``, ``mvit-b``, ``roberta-base``,
``vit-test``, ...). Its methods (``--methods``):

* ``standard``: the standard twin (``vit-b``) under plain autodiff;
* ``remat`` / ``remat-dots``: the standard twin rematerialising each layer
  (``set_remat``: ``nothing_saveable`` / ``dots_with_no_batch_dims_saveable``);
* ``rev-backprop``, ``reprop``, ``pareprop``: the reversible model (``rev-vit-b``) in that
  mode; ``pareprop+streams`` (``--backend gpu-compile`` only): with ``GPU_STREAMS``.

``--depths`` sets the depth (ViT, RoBERTa) or the third stage's block count (Swin, MViT).

Measures, per cell (one method at one batch size, depth, input size and dtype):

* memory, ``--backend cpu`` (jax): XLA's compiled memory analysis of the training loss's
  gradient function (parameters and batch in, gradients out, the activations as its
  temporaries), exact with no run, plus AdamW's two moments; ``gpu-compile``: the same
  compiled for an H200 without a GPU (in a process that sees the CUDA compile plugin:
  ``make`` installs it apart, in ``.venv/gpu-compile``, and this command reruns itself
  there, ``revjax.gpu.rerun_with_plugin``); ``gpu``: the compiled analysis on the device,
  and the device's peak bytes in use over the library's training step
  (``revjax.train.make_train_step``). torch: the peak of live allocated bytes over the
  training loss's gradient computation, forward and backward (activations, saved tensors,
  what the backward rebuilds or recomputes, its temporaries, the gradients; on CPU from the
  allocator's events through ``torch.profiler``, on CUDA ``max_memory_allocated``), plus
  parameters, batch and AdamW's moments. (The optimizer update's own temporaries are left
  out, as in jax: at small batch they are larger than a reversible model's activations and
  would hide them; a GPU cell's ``device_peak_bytes`` is a whole step's.)
* speed: samples per second of the training step (median of timed steps after warm-up,
  with the quartiles; the methods of one config run round-robin, so drift hits all alike).

Every cell is one line of ``results/bench/cells.jsonl`` (``--results``) with its config,
versions, device and date, the file rewritten atomically after each cell; a rerun skips
cells already there (``--redo`` measures them again). ``report`` derives memory per sample
(the slope over batch size), the fixed part, the largest batch in ``--budget-gib``, the
PaReprop/Reprop speed ratio, and draws the figures.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from experiments.bench import demo, grid, report
from experiments.bench.cells import BACKENDS, DTYPES, GPU_METHODS
from experiments.bench.results import DEMO_RESULTS, RESULTS
from experiments.common import table

# The suite's other experiments, each a probe with ``main(argv)``, run as sub-commands.
SUBCOMMANDS = {
    "numerics": ("experiments.probes.numerics",
                 "rebuild drift per dtype, precision policy, anchors"),
    "overlap": ("experiments.probes.overlap",
                "GPU stream overlap of pareprop from profiler traces"),
    "gpu-compile": ("experiments.probes.gpu_compile",
                    "compile every family and mode for an H200, no GPU"),
    "parity": ("experiments.probes.parity_report",
               "revjax vs revtorch outputs and gradients, per case"),
    "profile": ("experiments.probes.profile_modes", "where each mode spends its time (XLA:CPU)"),
    "pareprop-cpu": ("experiments.probes.pareprop_cpu",
                     "PaReprop vs Reprop on XLA:CPU, flag variants"),
    "xla-cpu-overlap": ("experiments.probes.xla_cpu_overlap",
                        "does XLA:CPU overlap two independent chains"),
    "params": ("experiments.probes.param_counts", "parameter counts of every registered model"),
}


def add_grid_args(p: argparse.ArgumentParser) -> None:
    d = grid.GRID
    p.add_argument("--frameworks", nargs="+", default=d["frameworks"], choices=tuple(BACKENDS))
    p.add_argument("--backend", default=d["backend"], choices=("cpu", "gpu-compile", "gpu"))
    p.add_argument("--models", nargs="+", default=d["models"])
    p.add_argument("--methods", nargs="+", default=d["methods"], choices=GPU_METHODS)
    p.add_argument("--batches", nargs="+", type=int, default=d["batches"])
    p.add_argument("--depths", nargs="+", type=int, default=d["depths"])
    p.add_argument("--size", type=int, default=d["size"],
                   help="image size (vision; default 224) or sequence length (text; 128)")
    p.add_argument("--dtype", default=d["dtype"], choices=DTYPES)
    p.add_argument("--redo", action="store_true", help="measure cells already recorded")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None,
                    help=f"folder of cells.jsonl and plots (default {RESULTS}; demo: "
                    f"{DEMO_RESULTS})")
    sub = ap.add_subparsers(dest="command", required=True)
    add_grid_args(sub.add_parser("memory", help="training-step memory cells"))
    sp = sub.add_parser("speed", help="training-step throughput cells")
    add_grid_args(sp)
    sp.add_argument("--warmup", type=int, default=grid.SPEED["warmup"])
    sp.add_argument("--reps", type=int, default=grid.SPEED["reps"])
    sp.add_argument("--max-batch-gib", type=float, default=None,
                    help="instead of --batches: each method at its largest batch in this "
                    "many GiB, from the memory cells already recorded")
    sp.add_argument("--max-batch-cap", type=int, default=grid.SPEED["max_batch_cap"])
    rp = sub.add_parser("report", help="tables and plots from the results")
    rp.add_argument("--budget-gib", type=float, default=80.0)
    dp = sub.add_parser("demo", help="the main job: memory at real size, speed, report")
    dp.add_argument("--smoke", action="store_true", help="the smallest configs (tests)")
    for name, (module, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=f"{help_} ({module}; its own flags)", add_help=False)
    return ap


def _needs_plugin(args) -> bool:
    """jax memory cells compiled for an H200: only a process that sees the CUDA plugin."""
    return (args.command == "memory" and args.backend == "gpu-compile"
            and "jax" in args.frameworks)


def _rerun_with_plugin(argv: list[str]) -> int | None:
    """None where this process sees the CUDA plugin; else the exit code of this command run
    in a subprocess that does (the plugin installed apart, ``.venv/gpu-compile``)."""
    from revjax import gpu

    try:
        return gpu.rerun_with_plugin("experiments.bench", argv)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = 2 if argv[:1] == ["--results"] else 0  # the other experiments have their own --out
    if len(argv) > first and argv[first] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[first]][0])
        out = module.main(argv[first + 1:])
        return out if isinstance(out, int) else 0
    args = parser().parse_args(argv)
    if not (args.command in ("memory", "speed") and args.backend == "gpu"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU, or an H200 target compiled on it
    if _needs_plugin(args):
        rc = _rerun_with_plugin(argv)
        if rc is not None:
            return rc
    args.results = args.results or (DEMO_RESULTS if args.command == "demo" else RESULTS)
    args.results_file = os.path.join(args.results, "cells.jsonl")
    if args.command == "memory":
        rows = grid.run_memory(args)
    elif args.command == "speed":
        rows = grid.run_speed(args)
    elif args.command == "report":
        return report.main(["--results", args.results, "--budget-gib", str(args.budget_gib)])
    else:
        return demo.run(args.results, smoke=args.smoke)
    cols = ["framework", "backend", "model", "method", "batch", "depth", "size", "dtype"]
    extra = ["total_bytes", "temp_bytes", "peak_bytes", "kept_bytes", "device_peak_bytes",
             "samples_per_s", "error"]
    print(table(rows, cols + [c for c in extra if any(c in r for r in rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
