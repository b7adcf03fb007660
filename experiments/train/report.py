"""Aggregate the training sweep (``experiments/train/sweep.py``): test accuracy mean ± spread
per model, mode and dtype, the targets (reversible vs standard within 1 point or the seeds'
spread; bf16 within 1 point of float32), the largest loss-curve difference between modes for
one seed, MLM eval losses; a markdown table, ``report.json`` and two PNG plots (jax). Runs of
``sweep --framework torch`` get a table and targets of their own, after the jax ones.

    python -m experiments.train.report [--runs results/train/runs] [--out results/train]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

from experiments.common import atomic_write_json

FAMILIES = {"vit": ("rev-vit-test", "vit-test"), "swin": ("rev-swin-test", "swin-test"),
            "roberta": ("rev-roberta-test", "roberta-test")}
MODES = ("backprop", "reprop", "pareprop")


def load(runs: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(runs, "*", "summary.json"))):
        with open(path) as f:
            s = json.load(f)
        if s.get("status") != "done":
            continue
        s["dir"] = os.path.dirname(path)
        out.append(s)
    return out


def curve(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(summaries: list[dict]) -> dict:
    groups: dict = {}
    for s in summaries:
        c = s["config"]
        key = (c.get("framework", "jax"), c["model"], s["mode"], c["dtype"])
        metric = s.get("eval_accuracy", s.get("eval_loss"))
        groups.setdefault(key, []).append((c["seed"], metric, s["dir"]))
    rows = []
    for (framework, model, mode, dtype), vals in sorted(groups.items()):
        vals.sort()
        metric = "eval_accuracy" if "roberta" not in model else "eval_loss"
        rows.append({"framework": framework, "model": model, "mode": mode, "dtype": dtype,
                     "metric": metric,
                     "seeds": [v[0] for v in vals], **_stats([v[1] for v in vals]),
                     "dirs": {v[0]: v[2] for v in vals}})
    return {"rows": rows}


def targets(rows: list[dict]) -> list[dict]:
    """Reversible vs standard (each mode) per dtype; bf16 vs float32 per model and mode."""
    by = {(r["model"], r["mode"], r["dtype"]): r for r in rows}
    out = []
    for fam in ("vit", "swin"):
        rev, std = FAMILIES[fam]
        for dtype in ("float32", "bfloat16"):
            ref = by.get((std, "backprop", dtype))
            for mode in MODES:
                r = by.get((rev, mode, dtype))
                if r is None or ref is None:
                    continue
                diff = 100 * (r["mean"] - ref["mean"])
                spread = 100 * max(r["std"], ref["std"])
                out.append({"check": f"{rev} {mode} vs {std} ({dtype})",
                            "diff_points": diff, "bound_points": max(1.0, spread),
                            "met": diff >= -max(1.0, spread)})
        for model in (rev, std):
            for mode in (MODES if model == rev else ("backprop",)):
                a, b = by.get((model, mode, "bfloat16")), by.get((model, mode, "float32"))
                if a is None or b is None:
                    continue
                diff = 100 * (a["mean"] - b["mean"])
                out.append({"check": f"{model} {mode} bfloat16 vs float32",
                            "diff_points": diff, "bound_points": 1.0, "met": diff >= -1.0})
    return out


def mode_curves(rows: list[dict], seed: int = 0) -> list[dict]:
    """Largest |loss(mode) - loss(backprop)| over the steps of one seed, per model/dtype."""
    by = {(r["model"], r["mode"], r["dtype"]): r for r in rows}
    out = []
    for fam in ("vit", "swin"):
        rev = FAMILIES[fam][0]
        for dtype in ("float32", "bfloat16"):
            ref = by.get((rev, "backprop", dtype))
            if ref is None or seed not in ref["dirs"]:
                continue
            base = curve(ref["dirs"][seed])
            for mode in ("reprop", "pareprop"):
                r = by.get((rev, mode, dtype))
                if r is None or seed not in r["dirs"]:
                    continue
                other = curve(r["dirs"][seed])
                diffs = [abs(a - b) for a, b in zip(other, base)]
                step = max(range(len(diffs)), key=diffs.__getitem__)
                above = [i + 1 for i, d in enumerate(diffs) if d > 1e-3]
                out.append({"model": rev, "dtype": dtype, "mode": mode, "seed": seed,
                            "steps": len(diffs), "max_abs_diff": diffs[step],
                            "at_step": step + 1, "loss_there": base[step],
                            "max_abs_diff_first_10_steps": max(diffs[:10]),
                            "first_step_above_1e-3": above[0] if above else None})
            r, p = by.get((rev, "reprop", dtype)), by.get((rev, "pareprop", dtype))
            if r and p and seed in r["dirs"] and seed in p["dirs"]:
                diffs = [abs(a - b) for a, b in zip(curve(r["dirs"][seed]),
                                                    curve(p["dirs"][seed]))]
                above = [i + 1 for i, d in enumerate(diffs) if d > 1e-3]
                out.append({"model": rev, "dtype": dtype, "mode": "pareprop vs reprop",
                            "seed": seed, "steps": len(diffs), "max_abs_diff": max(diffs),
                            "at_step": diffs.index(max(diffs)) + 1,
                            "max_abs_diff_first_10_steps": max(diffs[:10]),
                            "first_step_above_1e-3": above[0] if above else None})
    return out


def unigram_baseline(seq_len: int = 64) -> float:
    """Test cross-entropy (nats/byte) of the training set's byte frequencies (add-one): what
    an MLM that ignores the context reaches (it sees the same masked-token distribution)."""
    import numpy as np

    from experiments.train import data as data_lib

    d = data_lib.load("stdlib-docstrings", length=seq_len)
    train, test = d.train.x[d.train.x < 256], d.test.x[d.test.x < 256]
    p = np.bincount(train, minlength=256) + 1.0
    return float(-np.log(p[test] / p.sum()).mean())


def _pm(r: dict, scale: float, digits: int) -> str:
    return (f"{scale * r['mean']:.{digits}f} ± {scale * r['std']:.{digits}f} "
            f"({scale * r['min']:.{digits}f}-{scale * r['max']:.{digits}f})")


def markdown(rows, checks, curves, title: str | None = None) -> str:
    lines = [f"{title}", ""] if title else []
    lines += ["| model | mode | float32 test acc % | bfloat16 test acc % |",
              "| --- | --- | --- | --- |"]
    by = {(r["model"], r["mode"], r["dtype"]): r for r in rows}
    for fam in ("vit", "swin"):
        rev, std = FAMILIES[fam]
        for model, mode in [(rev, m) for m in MODES] + [(std, "backprop")]:
            if not any((model, mode, d) in by for d in ("float32", "bfloat16")):
                continue
            cells = [(_pm(by[(model, mode, d)], 100, 1) + f", n={by[(model, mode, d)]['n']}")
                     if (model, mode, d) in by else "-" for d in ("float32", "bfloat16")]
            lines.append(f"| {model} | {mode} | {cells[0]} | {cells[1]} |")
    mlm = [r for r in rows if r["metric"] == "eval_loss"]
    if mlm:
        lines += ["", "| model | mode | eval MLM loss (nats/token) |", "| --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['mode']} | {_pm(r, 1, 3)}, n={r['n']} |" for r in mlm]
        lines += [f"| byte unigram (no context) | - | {unigram_baseline():.3f} |"]
    if curves:
        lines += ["", "| model | dtype | curve vs backprop (seed 0) | max loss diff | at step "
                  "| first 10 steps | first step > 1e-3 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['model']} | {c['dtype']} | {c['mode']} | {c['max_abs_diff']:.2e} | "
                  f"{c['at_step']} | {c['max_abs_diff_first_10_steps']:.1e} | "
                  f"{c['first_step_above_1e-3'] or '-'} |" for c in curves]
    if checks:
        lines += ["", "| target | diff (points) | bound | met |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['check']} | {c['diff_points']:+.2f} | {c['bound_points']:.2f} | "
                  f"{'yes' if c['met'] else 'no'} |" for c in checks]
    return "\n".join(lines) + "\n"


def plots(rows, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    order = [(m, mode) for fam in ("vit", "swin") for m in FAMILIES[fam] for mode in MODES]
    vision = sorted((r for r in rows if r["metric"] == "eval_accuracy"),
                    key=lambda r: (order.index((r["model"], r["mode"])), r["dtype"] != "float32"))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels = []
    for i, r in enumerate(vision):
        x = i
        color = "tab:blue" if r["dtype"] == "float32" else "tab:orange"
        ax.bar(x, 100 * r["mean"], yerr=100 * r["std"], color=color, capsize=3)
        ax.scatter([x] * r["n"], [100 * v for v in r["values"]], s=8, color="k", zorder=3)
        labels.append(f"{r['model'].replace('-test', '')}\n{r['mode'][:4]} "
                      f"{'bf16' if r['dtype'] == 'bfloat16' else 'f32'}")
    ax.set_xticks(range(len(vision)), labels, fontsize=6)
    lo = min((100 * r["min"] for r in vision), default=0)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("digits test accuracy %")
    ax.set_title("mean ± std over seeds (dots: seeds); blue float32, orange bfloat16")
    fig.tight_layout()
    paths.append(os.path.join(out, "accuracy.png"))
    fig.savefig(paths[-1] + ".tmp.png", dpi=110)
    os.replace(paths[-1] + ".tmp.png", paths[-1])
    plt.close(fig)

    by = {(r["model"], r["mode"], r["dtype"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, fam in zip(axes, ("vit", "swin", "roberta")):
        rev, std = FAMILIES[fam]
        for model, mode, style in [(rev, "backprop", "-"), (rev, "reprop", "--"),
                                   (rev, "pareprop", ":"), (std, "backprop", "-")]:
            r = by.get((model, mode, "float32"))
            if r is None or 0 not in r["dirs"]:
                continue
            ax.plot(curve(r["dirs"][0]), style, lw=1, label=f"{model} {mode}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{fam}: training loss, seed 0, float32", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out, "loss_curves.png"))
    fig.savefig(paths[-1] + ".tmp.png", dpi=110)
    os.replace(paths[-1] + ".tmp.png", paths[-1])
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/train/runs")
    p.add_argument("--out", default="results/train")
    args = p.parse_args(argv)
    all_rows = aggregate(load(args.runs))["rows"]
    rows = [r for r in all_rows if r["framework"] == "jax"]
    checks, curves = targets(rows), mode_curves(rows)
    md = markdown(rows, checks, curves)
    torch_rows = [r for r in all_rows if r["framework"] == "torch"]
    torch_checks, torch_curves = targets(torch_rows), mode_curves(torch_rows)
    if torch_rows:
        md += "\n" + markdown(torch_rows, torch_checks, torch_curves,
                              title="torch (revtorch, `python -m experiments.train.sweep "
                              "--framework torch`):")
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "table.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(args.out, "table.md"))
    pngs = plots(rows, args.out)
    atomic_write_json(os.path.join(args.out, "report.json"),
                      {"rows": [{k: v for k, v in r.items() if k != "dirs"} for r in all_rows],
                       "targets": checks, "mode_curves": curves, "torch_targets": torch_checks,
                       "torch_mode_curves": torch_curves, "plots": pngs})
    print(md)


if __name__ == "__main__":
    main()
