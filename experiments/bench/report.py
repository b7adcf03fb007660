"""Tables and plots from the benchmark suite's cells (``results/bench/cells.jsonl``).

    python -m experiments.bench report [--results results/bench] [--budget-gib 80]

Writes ``report.md`` (the tables) and the figures beside the cells, atomically:
``memory_vs_batch.png``, ``memory_vs_depth.png``, ``throughput_vs_batch.png``,
``pareprop_speedup.png``. Memory per sample is the least-squares slope of a cell group's
training-step bytes over batch size and the fixed part its intercept; the largest batch
that fits the budget follows from both. Figures measured on CPU say so in their titles.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import tempfile

from experiments.bench.cells import ORDER
from experiments.bench.results import RESULTS, load
from experiments.common import table

MiB, GiB = 2**20, 2**30


def measure(row: dict) -> float | None:
    """The training-step bytes of a memory cell (``total_bytes``): the compiled gradient
    function plus the optimizer moments (jax), or the peak of live bytes over the gradient
    computation plus parameters, batch and moments (torch); else the device's peak."""
    for k in ("total_bytes", "device_peak_bytes"):
        if row.get(k) is not None:
            return float(row[k])
    return None


def _label(row: dict) -> str:
    where = {"cpu": "CPU", "gpu-compile": "H200 compile", "gpu": "GPU"}[row["backend"]]
    return f"{row['framework']} {where}"


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of bytes over batch."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (v - my) for b, v in points) / sxx
    return slope, my - slope * mx


def _sort(rows, *keys):
    return sorted(rows, key=lambda r: tuple(
        ORDER.index(r[k]) if k == "method" and r[k] in ORDER else (r[k] or 0)
        if k in ("depth", "batch") else str(r[k]) for k in keys))


def memory_table(cells: list[dict], budget_gib: float) -> list[dict]:
    groups = collections.defaultdict(list)
    for r in cells:
        if r["kind"] == "memory" and "error" not in r and measure(r) is not None:
            groups[(r["framework"], r["backend"], r["model"], r["method"], r["depth"],
                    r["size"], r["dtype"])].append(r)
    out = []
    for (fw, backend, model, method, depth, size, dtype), rows in groups.items():
        points = sorted({r["batch"]: measure(r) for r in rows}.items())
        if len(points) < 2:
            continue
        slope, fixed = _fit(points)
        out.append({"framework": fw, "backend": backend, "model": model, "method": method,
                    "depth": depth, "size": size, "dtype": dtype, "where": _label(rows[0]),
                    "MiB/sample": slope / MiB, "fixed MiB": fixed / MiB,
                    "max batch": (math.floor((budget_gib * GiB - fixed) / slope)
                                  if slope > 0 else None)})
    standard = {(r["where"], r["model"], r["depth"], r["size"], r["dtype"]): r["MiB/sample"]
                for r in out if r["method"] == "standard"}
    for r in out:
        ref = standard.get((r["where"], r["model"], r["depth"], r["size"], r["dtype"]))
        r["vs standard"] = ref / r["MiB/sample"] if ref and r["MiB/sample"] > 0 else None
    return _sort(out, "where", "model", "depth", "method")


def depth_table(mem: list[dict]) -> list[dict]:
    """Memory per sample (``memory_table``'s slopes) at each benchmarked depth: the
    activation memory, without the parameters and optimizer state that grow with depth."""
    groups = collections.defaultdict(dict)
    for r in mem:
        if r["depth"] is not None:
            groups[(r["where"], r["model"], r["method"], r["size"], r["dtype"])][r["depth"]] = (
                r["MiB/sample"])
    out = []
    for (where, model, method, size, dtype), by_depth in groups.items():
        if len(by_depth) < 2:
            continue
        depths = sorted(by_depth)
        row = {"where": where, "model": model, "method": method, "size": size, "dtype": dtype}
        for d in depths:
            row[f"d{d} MiB/sample"] = by_depth[d]
        row["deepest / shallowest"] = by_depth[depths[-1]] / by_depth[depths[0]]
        row["_depths"] = depths
        out.append(row)
    return _sort(out, "where", "model", "method")


def speed_table(cells: list[dict]) -> list[dict]:
    groups = collections.defaultdict(dict)
    for r in cells:
        if r["kind"] == "speed" and "error" not in r:
            groups[(r["framework"], _label(r), r["model"], r["batch"], r["depth"], r["size"],
                    r["dtype"])][r["method"]] = r
    out = []
    for (fw, where, model, batch, depth, size, dtype), by_method in groups.items():
        row = {"where": where, "model": model, "batch": batch, "depth": depth, "size": size,
               "dtype": dtype}
        for m in ORDER:
            if m in by_method:
                c = by_method[m]
                row[f"{m} /s"] = c["samples_per_s"]
                row[f"_{m}_spread"] = (c["batch"] / c["step_s_q3"], c["batch"] / c["step_s_q1"])
        if "pareprop /s" in row and "reprop /s" in row:
            row["pareprop / reprop"] = row["pareprop /s"] / row["reprop /s"]
        out.append(row)
    return _sort(out, "where", "model", "depth", "batch")


def framework_table(speed: list[dict]) -> list[dict]:
    """revjax's step time against revtorch's on the same model, batch and method."""
    by = {}
    for r in speed:
        fw, where = r["where"].split(" ", 1)
        by[(fw, where, r["model"], r["batch"], r["depth"], r["size"], r["dtype"])] = r
    out = []
    for (fw, where, *rest), r in by.items():
        other = by.get(("torch", where, *rest))
        if fw != "jax" or other is None:
            continue
        row = {"where": where, "model": rest[0], "batch": rest[1], "size": rest[3]}
        for m in ORDER:
            if f"{m} /s" in r and f"{m} /s" in other:
                row[f"{m}: torch/jax time"] = r[f"{m} /s"] / other[f"{m} /s"]
        out.append(row)
    return out


REVERSIBLE = ("reprop", "pareprop", "pareprop+streams")


def headline_table(mem: list[dict], where: str) -> list[dict]:
    """One row per model (default depth): memory per sample of each method, each reversible
    method against remat (below 1: it needs less) and the standard twin's multiple of it,
    and the largest batch in the budget."""
    by = collections.defaultdict(dict)
    for r in mem:
        if r["where"] == where and r["depth"] is None and r["dtype"] == "float32":
            by[(r["model"], r["size"])][r["method"]] = r
    streams = any("pareprop+streams" in m for m in by.values())
    reversible = [k for k in REVERSIBLE if streams or k != "pareprop+streams"]
    out = []
    for (model, size), m in sorted(by.items()):
        mib = lambda k: m[k]["MiB/sample"] if k in m else None
        ratio = lambda a, b: mib(a) / mib(b) if mib(a) and mib(b) else None
        row = {"model": f"{model} ({size})"}
        for k in ["standard", "remat", *reversible]:
            row[f"{k} MiB/sample"] = mib(k)
        for k in reversible:
            row[f"{k} / remat"] = ratio(k, "remat")
        for k in reversible:
            row[f"standard / {k}"] = ratio("standard", k)
        for k in ("standard", "remat", "reprop", "pareprop"):
            row[f"max batch {k}"] = m[k]["max batch"] if k in m else None
        out.append(row)
    return out


def headline_lines(rows: list[dict]) -> list[str]:
    """``headline_table``'s ratios in words, a line per model and reversible method, saying
    plainly where the method is not below remat (or not below the standard twin)."""
    lines = []
    for row in rows:
        for k in REVERSIBLE:
            mib = row.get(f"{k} MiB/sample")
            if mib is None:
                continue
            text = f"{row['model']} {k}: {mib:.3g} MiB/sample"
            vs_remat, vs_standard = row.get(f"{k} / remat"), row.get(f"standard / {k}")
            if vs_remat is not None:
                text += f", {vs_remat:.2f}x remat" + (
                    "" if vs_remat < 1 else ", NOT below remat")
            if vs_standard is not None:
                text += (f", {vs_standard:.3g}x below standard" if vs_standard > 1
                         else f", {1 / vs_standard:.3g}x standard, NOT below standard")
            lines.append(text)
    return lines


def _fmt(rows: list[dict]) -> list[dict]:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else v

    return [{k: f(v) for k, v in r.items() if not k.startswith("_")} for r in rows]


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not k.startswith("_")]
    return cols


# ------------------------------------------------------------------------------- plots


def _save_figure(fig, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, list(axes.flat)


def _line_panels(panels: dict, path: str, xlabel: str, ylabel: str, *, min_points: int = 1,
                 log: bool = False) -> bool:
    """One subplot per panel title, one line per method (``{title: {method: {x: y}}}``)."""
    panels = {t: m for t, m in panels.items()
              if any(len(pts) >= min_points for pts in m.values())}
    if not panels:
        return False
    plt, fig, axes = _grid(len(panels))
    for ax, title in zip(axes, sorted(panels)):
        for method in ORDER:
            pts = sorted(panels[title].get(method, {}).items())
            if len(pts) >= min_points:
                ax.plot(*zip(*pts), marker="o", label=method, color=f"C{ORDER.index(method)}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)
    return True


def _nested():
    return collections.defaultdict(lambda: collections.defaultdict(dict))


def plot_memory_vs_batch(cells, path) -> bool:
    panels = _nested()
    for r in cells:
        if r["kind"] == "memory" and "error" not in r and measure(r) is not None:
            depth = "" if r["depth"] is None else f" d{r['depth']}"
            title = f"{r['model']} {r['size']}{depth} ({_label(r)})"
            panels[title][r["method"]][r["batch"]] = measure(r) / GiB
    return _line_panels(panels, path, "batch size", "training-step memory (GiB)", min_points=2)


def plot_memory_vs_depth(depth_rows, path) -> bool:
    panels = _nested()
    for r in depth_rows:
        title = f"{r['model']} {r['size']} ({r['where']})"
        panels[title][r["method"]] = {d: r[f"d{d} MiB/sample"] for d in r["_depths"]}
    return _line_panels(panels, path, "depth", "memory per sample (MiB)", log=True)


def plot_throughput(cells, path) -> bool:
    panels = _nested()
    for r in cells:
        if r["kind"] == "speed" and "error" not in r:
            title = f"{r['model']} {r['size']} ({_label(r)})"
            panels[title][r["method"]][r["batch"]] = r["samples_per_s"]
    return _line_panels(panels, path, "batch size", "samples / s")


def plot_speedup(speed_rows, path) -> bool:
    rows = [r for r in speed_rows if "pareprop / reprop" in r]
    if not rows:
        return False
    plt, fig, (ax,) = _grid(1)
    labels = [f"{r['model']} b{r['batch']} ({r['where']})" for r in rows]
    ax.bar(range(len(rows)), [r["pareprop / reprop"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("PaReprop speed / Reprop speed")
    _save_figure(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------- main


def build(results: str, budget_gib: float) -> tuple[str, list[str]]:
    cells = load(os.path.join(results, "cells.jsonl"))
    mem, speed = memory_table(cells, budget_gib), speed_table(cells)
    depth = depth_table(mem)
    fw = framework_table(speed)
    parts = [f"# Benchmark results ({len(cells)} cells)\n"]
    for where in sorted({r["where"] for r in mem}):
        rows = headline_table(mem, where)
        if rows:
            words = "".join(f"- {line}\n" for line in headline_lines(rows))
            parts.append(f"## Headline, {where}: memory per sample (MiB), largest batch in "
                         f"{budget_gib:g} GiB\n\n{table(_fmt(rows), _columns(rows))}\n\n"
                         f"{words}")
    for title, rows in [
            (f"Memory per sample (slope over batch) and the largest batch in {budget_gib:g} "
             "GiB", mem),
            ("Memory per sample over depth", depth),
            ("Throughput (samples/s, median of timed steps)", speed),
            ("revtorch step time over revjax's (above 1: jax faster)", fw)]:
        if rows:
            parts.append(f"## {title}\n\n{table(_fmt(rows), _columns(rows))}\n")
    errors = [r for r in cells if "error" in r]
    if errors:
        parts.append("## Cells that failed\n\n" + table(
            [{"cell": r["key"], "error": r["error"][:120]} for r in errors],
            ["cell", "error"]) + "\n")
    figures = []
    for name, draw in [("memory_vs_batch.png", lambda p: plot_memory_vs_batch(cells, p)),
                       ("memory_vs_depth.png", lambda p: plot_memory_vs_depth(depth, p)),
                       ("throughput_vs_batch.png", lambda p: plot_throughput(cells, p)),
                       ("pareprop_speedup.png", lambda p: plot_speedup(speed, p))]:
        if draw(os.path.join(results, name)):
            figures.append(name)
    return "\n".join(parts), figures


def write(results: str, budget_gib: float = 80.0) -> tuple[str, list[str]]:
    """Write ``report.md`` and the figures into ``results`` (atomically); returns the text
    and the paths written."""
    os.makedirs(results, exist_ok=True)
    text, figures = build(results, budget_gib)
    path = os.path.join(results, "report.md")
    fd, tmp = tempfile.mkstemp(dir=results, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n" + "".join(f"![{n}]({n})\n" for n in figures))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return text, [path, *(os.path.join(results, n) for n in figures)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--budget-gib", type=float, default=80.0)
    args = ap.parse_args(argv)
    text, paths = write(args.results, args.budget_gib)
    print(text)
    print("wrote", *paths)
    return 0
