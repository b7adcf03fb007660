"""Running a grid of cells: every (framework, model, depth, batch, method) the arguments name,
each cell recorded as soon as it is measured; cells already recorded are skipped unless
``redo``. Speed cells that differ only in method are timed together, round-robin."""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

from experiments.bench import measure_jax, measure_torch, report
from experiments.bench.cells import METHODS, Cell, check_cell, default_size
from experiments.bench.results import env_summary, load, record

# The grid's settings and their defaults (the command line's, cli.add_grid_args).
GRID = dict(frameworks=["jax"], backend="cpu", models=["vit-test"],
            methods=list(METHODS),
            batches=[2, 4], depths=None, size=None, dtype="float32", redo=False)
SPEED = dict(warmup=2, reps=5, max_batch_gib=None, max_batch_cap=1024)


def grid_args(results: str, **settings) -> argparse.Namespace:
    """The arguments of a grid writing into folder ``results``: ``GRID`` and ``SPEED``'s
    defaults, overridden by ``settings``."""
    unknown = set(settings) - set(GRID) - set(SPEED)
    if unknown:
        raise TypeError(f"unknown grid settings {sorted(unknown)}")
    return argparse.Namespace(**{**GRID, **SPEED, **settings}, results=results,
                              results_file=os.path.join(results, "cells.jsonl"))


def _max_batches(args) -> dict[tuple, int]:
    """Per (framework, backend, model, method, depth, size, dtype): the largest batch that
    fits ``--max-batch-gib`` by the memory cells already recorded (capped)."""
    rows = report.memory_table(load(args.results_file), args.max_batch_gib)
    return {(r["framework"], r["backend"], r["model"], r["method"], r["depth"], r["size"],
             r["dtype"]): min(r["max batch"], args.max_batch_cap)
            for r in rows if r["max batch"] and r["max batch"] > 0}


def cells(args, kind: str) -> list[Cell]:
    """The cells of ``args``' grid; with ``max_batch_gib`` each method at its largest batch
    from the memory cells recorded (methods without them are left out)."""
    fits = _max_batches(args) if getattr(args, "max_batch_gib", None) else None
    out = []
    for fw in args.frameworks:
        for model in args.models:
            size = args.size or default_size(model)
            for depth in args.depths or [None]:
                for batch in args.batches if fits is None else [None]:
                    for method in args.methods:
                        if method == "pareprop+streams" and args.backend != "gpu-compile":
                            continue
                        if fw == "torch" and args.backend == "gpu-compile":
                            continue
                        if fits is not None:
                            batch = fits.get(
                                (fw, args.backend, model, method, depth, size, args.dtype))
                            if not batch:
                                continue
                        cell = Cell(kind, fw, args.backend, model, method, batch, depth, size,
                                    args.dtype)
                        check_cell(cell)
                        out.append(cell)
    return out


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def run_memory(args) -> list[dict]:
    done = {r["key"] for r in load(args.results_file)}
    env, rows = env_summary(), []
    for cell in _progress(cells(args, "memory"), "memory"):
        if cell.key in done and not args.redo:
            continue
        t = time.perf_counter()
        try:
            measure = measure_jax if cell.framework == "jax" else measure_torch
            result = measure.memory(cell)
        except Exception as e:  # noqa: BLE001 (recorded; the other cells still run)
            result = {"error": _error(e)}
        result["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(record(args.results_file, cell, result, env))
    return rows


def run_speed(args) -> list[dict]:
    """Cells that differ only in method are timed together, round-robin."""
    done = {r["key"] for r in load(args.results_file)}
    env, rows = env_summary(), []
    groups: dict[str, list[Cell]] = {}
    for cell in cells(args, "speed"):
        if cell.key not in done or args.redo:
            groups.setdefault(dataclasses.replace(cell, method="").key, []).append(cell)
    for group in _progress(list(groups.values()), "speed"):
        runners, errors = {}, {}
        for cell in group:
            try:
                measure = measure_jax if cell.framework == "jax" else measure_torch
                runners[cell] = measure.runner(cell)
                for _ in range(args.warmup):
                    runners[cell]()
            except Exception as e:  # noqa: BLE001
                runners.pop(cell, None)
                errors[cell] = _error(e)
        times: dict[Cell, list[float]] = {c: [] for c in runners}
        for _ in range(args.reps):
            for cell, run in runners.items():
                t = time.perf_counter()
                run()
                times[cell].append(time.perf_counter() - t)
        for cell in group:
            if cell in errors:
                result = {"error": errors[cell]}
            else:
                ts = sorted(times[cell])
                q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
                result = {"step_s": statistics.median(ts), "step_s_q1": q[0],
                          "step_s_q3": q[2], "reps": len(ts),
                          "samples_per_s": cell.batch / statistics.median(ts)}
            rows.append(record(args.results_file, cell, result, env))
        del runners
    return rows
