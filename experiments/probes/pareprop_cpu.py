"""PaReprop against Reprop and backprop on XLA:CPU: the CPU targets in one command.

    python -m experiments.bench pareprop-cpu             # Rev-ViT-S at b8/224 and b1/96, + small
    python -m experiments.bench pareprop-cpu --quick     # b1/96 and the small configs only
    python -m experiments.bench pareprop-cpu --out results/pareprop_cpu.json

Each (config, variant) runs in its own process (XLA flags are read once per process) through
``profile_modes.profile``: the three modes of one config compiled side by side and timed
round-robin (interleaved medians), so machine drift hits every mode alike. Variants:

* ``shipped``: the library as it is;
* ``region-analysis``: ``--xla_cpu_copy_insertion_use_region_analysis=true``, i.e.
  ``revjax.CPU_COMPILER_OPTIONS`` (removes the copies of the carried residuals in the
  backward loop);
* ``concurrent-scheduler`` (not run by default: it changed nothing): ``--xla_cpu_enable_
  concurrency_optimized_scheduler=true``, an HLO schedule meant to let XLA:CPU's thunk
  executor run independent ops at once.

The targets (2 CPU cores, Rev-ViT-S; docs/pareprop-cpu.md): pareprop >= 0.97x reprop's
speed at batch 8 / 224 px and batch 1 / 96 px; >= 1.2x where single ops leave cores idle;
reprop's step time <= 1.33x backprop's. The table says, per row, which are met. The
results file records the config, versions and machine, written atomically; the run resumes
from it (``--out``): rows already there are not measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from experiments.common import atomic_write_json, environment, table

# (label, model, img, batch, depth): the two target configs, then small ones where single
# ops are too small to occupy two cores.
CONFIGS = {
    "vit-s b8 224": ("rev-vit-s", 224, 8, None),
    "vit-s b1 96": ("rev-vit-s", 96, 1, None),
    "vit-ti b1 32": ("rev-vit-ti", 32, 1, None),
    "vit-test b1 32": ("rev-vit-test", 32, 1, 12),
}
QUICK = ("vit-s b1 96", "vit-ti b1 32", "vit-test b1 32")
VARIANTS = {
    "shipped": "",
    "region-analysis": "--xla_cpu_copy_insertion_use_region_analysis=true",
    "concurrent-scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}
PAREPROP_VS_REPROP, REPROP_VS_BACKPROP, IDLE_CORES_SPEEDUP = 0.97, 1.33, 1.2


def run_one(label: str, variant: str, reps: int) -> dict:
    """Measure one config under one variant in a fresh process; returns its result rows."""
    model, img, batch, depth = CONFIGS[label]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), VARIANTS[variant]]))
    code = ("import json; from experiments.probes import profile_modes; "
            f"print('ROWS' + json.dumps(profile_modes.profile({model!r}, {img}, {batch}, "
            f"{depth!r}, {reps}, None)))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout
    rows = json.loads(out.split("ROWS", 1)[1])
    return {r["mode"]: r for r in rows}


def summary(label: str, variant: str, rows: dict) -> dict:
    ms = {m: rows[m]["step ms"] for m in rows}
    par = ms["reprop"] / ms["pareprop"]  # pareprop's speed relative to reprop's
    rep = ms["reprop"] / ms["backprop"]  # reprop's step time relative to backprop's
    target = {"vit-s b8 224": PAREPROP_VS_REPROP, "vit-s b1 96": PAREPROP_VS_REPROP}.get(label)
    return {"config": label, "variant": variant,
            **{f"{m} ms": ms[m] for m in ("backprop", "reprop", "pareprop")},
            "pareprop speed vs reprop": f"{par:.3f}x",
            "target": f">= {target}x: {'met' if par >= target else 'NOT met'}" if target
            else f">= {IDLE_CORES_SPEEDUP}x: {'met' if par >= IDLE_CORES_SPEEDUP else 'no'}",
            "reprop time vs backprop": f"{rep:.3f}x "
            f"({'met' if rep <= REPROP_VS_BACKPROP else 'NOT met'})",
            "loop copies (re, pare)": f"{rows['reprop'].get('loop copies')}, "
            f"{rows['pareprop'].get('loop copies')}",
            "temp MiB (re, pare)": f"{rows['reprop']['temp MiB']}, "
            f"{rows['pareprop']['temp MiB']}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench pareprop-cpu",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the batch-8 / 224 px config")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=None)
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS),
                    default=["shipped", "region-analysis"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON results file (resumed if present)")
    args = ap.parse_args(argv)
    labels = args.configs or (list(QUICK) if args.quick else list(CONFIGS))
    done = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r["config"], r["variant"]): r for r in json.load(f)["results"]}
    try:
        from tqdm import tqdm
    except ImportError:  # progress only
        tqdm = lambda it, **_: it  # noqa: E731
    jobs = [(lab, var) for lab in labels for var in args.variants]
    for lab, var in tqdm(jobs, desc="configs x variants"):
        if (lab, var) in done:
            continue
        rows = run_one(lab, var, args.reps)
        done[(lab, var)] = {"config": lab, "variant": var, "rows": rows,
                            "summary": summary(lab, var, rows)}
        if args.out:  # after every row: a stopped run resumes here
            atomic_write_json(args.out, {"args": vars(args), "configs": CONFIGS,
                                         "variants": VARIANTS, "environment": environment(),
                                         "results": list(done.values())})
    summaries = [done[j]["summary"] for j in jobs]
    print(table(summaries, list(summaries[0])))


if __name__ == "__main__":
    main()
