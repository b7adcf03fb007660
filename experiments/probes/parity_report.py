"""Cross-framework parity: the largest relative differences between revjax and revtorch.

For each model, dtype, depth and (jax mode, torch mode) pair, on the same weights and inputs
(images for ViT, Swin and MViT, the hierarchical ones at their test variant's own stage
depths, shown as depth None; token ids with a padding mask for RoBERTa, at depth 2): the forward
outputs (the plain forward and the differentiated one) and the gradients (every parameter
leaf, and the images: token ids are not differentiated), as ``max|jax - torch| / max|torch|``.
The computation is the parity suite's (``experiments/probes/parity.py``); this prints it as a
markdown table and writes ``results/parity.json``.

    python -m experiments.bench parity          # all cases, ~6 min on 2 CPU cores
    python -m experiments.bench parity --gpu    # also PaReprop vs Reprop speed on GPU
"""

from __future__ import annotations

import argparse
import sys

from experiments.common import atomic_write_json, environment, table
from experiments.probes import parity

COLUMNS = ("model", "dtype", "depth", "jax mode", "torch mode", "forward", "gradients",
           "worst leaf", "tol fwd/grad", "ok")


def rows(models, dtypes, depths) -> list[dict]:
    out = []
    every = (parity.mode_cases()
             + parity.mode_cases(parity.ROBERTA_MODELS, parity.ROBERTA_DEPTHS)
             + parity.mode_cases(parity.SWIN_MODELS, parity.SWIN_DEPTHS)
             + parity.mode_cases(parity.MVIT_MODELS, parity.MVIT_DEPTHS))
    for name, dtype, depth, jax_mode, torch_mode in every:
        # depth None: a hierarchical model's own per-stage depths, reported whatever --depths
        if name not in models or dtype not in dtypes or depth not in (*depths, None):
            continue
        d = parity.grad_diffs(name, dtype, depth, jax_mode, torch_mode)
        forward = max(parity.forward_diff(name, dtype, depth), d["logits"])
        if d["input"] is None or d["params"] >= d["input"]:  # None: token ids
            grads, worst = d["params"], d["worst"]
        else:
            grads, worst = d["input"], "input"
        tol = parity.TOL[dtype]
        out.append({
            "model": name, "dtype": dtype, "depth": depth, "jax mode": jax_mode,
            "torch mode": torch_mode, "forward": forward, "gradients": grads,
            "worst leaf": worst, "tol fwd/grad": f"{tol['forward']:.0e}/{tol['grad']:.0e}",
            "ok": forward <= tol["forward"] and grads <= tol["grad"],
        })
    return out


def gpu_rows() -> list[dict]:
    out = []
    checks = (("revjax", bool(parity.jax_gpus()), parity.jax_gpu_speed),
              ("revtorch", parity.torch.cuda.is_available(), parity.torch_gpu_speed))
    for framework, available, fn in checks:
        if not available:
            print(f"{framework}: no CUDA device, GPU speed check skipped")
            continue
        r = fn()
        s = r["seconds"]
        out.append({"framework": framework,
                    "model": f"{parity.GPU_MODEL} {parity.GPU_IMG}px b{parity.GPU_BATCH}",
                    "reprop ms": f"{1e3 * s['reprop']:.1f}",
                    "pareprop ms": f"{1e3 * s['pareprop']:.1f}",
                    "speed-up": f"{s['reprop'] / s['pareprop']:.3f}x",
                    "grad rel diff": f"{r['grad_diff']:.1e}"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench parity",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=[*parity.MODELS, *parity.ROBERTA_MODELS, *parity.SWIN_MODELS,
                             *parity.MVIT_MODELS])
    ap.add_argument("--dtypes", nargs="+", default=list(parity.DTYPES))
    ap.add_argument("--depths", nargs="+", type=int, default=list(parity.DEPTHS))
    ap.add_argument("--gpu", action="store_true", help="also time PaReprop vs Reprop on GPU")
    ap.add_argument("--out", default="results/parity.json")
    args = ap.parse_args(argv)
    results = rows(args.models, args.dtypes, args.depths)
    for dtype in args.dtypes:
        print(f"\n{dtype}\n")
        print(table([{**r, "forward": f"{r['forward']:.1e}", "gradients": f"{r['gradients']:.1e}"}
                     for r in results if r["dtype"] == dtype], COLUMNS))
    speed = gpu_rows() if args.gpu else []
    if speed:
        print("\n" + table(speed, list(speed[0])))
    atomic_write_json(args.out, {"environment": environment(), "tolerances": parity.TOL,
                                 "batch": parity.BATCH, "rows": results, "gpu": speed})
    print(f"\nwrote {args.out}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
