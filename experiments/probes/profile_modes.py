"""Profiling harness: where does each backward mode spend its time?

For one model config, per mode: gradient-step time (median of interleaved runs after
warm-up), cores busy (CPU seconds per wall second: below the core count, cores sit idle,
which is the room PaReprop's overlap would need), compiled temp memory, and what the
compiled program does: op counts by kind for the whole module and for the backward loop
body (fusions, dots/convolutions, copies, dynamic slices), the loop's carried buffer count
and bytes.

    python -m experiments.bench profile --model rev-vit-s --img 96 --batch 1
    python -m experiments.bench profile --model rev-vit-s --img 224 --batch 8 --reps 5
    python -m experiments.bench profile ... --dump results/hlo   # write the optimised HLO
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import jax
from flax import nnx

import revjax
from revjax.train import cross_entropy_loss

from experiments.common import (atomic_write_json, cores_busy, environment,
                                interleaved_medians, table)

_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\S+?)(?:\[[^\]]*\])?(?:\{[^}]*\})? ([\w\-]+)\(",
                 re.M)
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8,
                "pred": 1, "u8": 1, "s8": 1}


def computations(hlo: str) -> dict[str, str]:
    """Optimised HLO text split into its computations, by name."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line.startswith("}") and name:
            out[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return out


def op_counts(text: str) -> collections.Counter:
    return collections.Counter(m.group(2) for m in _OP.finditer(text))


def shape_bytes(shape: str) -> int:
    total = 0
    for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def loop_stats(hlo: str) -> dict:
    """Stats of the largest while loop's body (the backward scan in reprop/pareprop),
    counting ops in the computations it calls (fusions) too."""
    comps = computations(hlo)
    whiles = [(line.split(" = ", 1)[1].split(" while(", 1)[0],
               re.search(r"body=%?([\w.\-]+)", line).group(1))
              for line in hlo.splitlines() if " while(" in line and "body=" in line]
    if not whiles:
        return {}

    def reach(name, seen):
        if name in seen or name not in comps:
            return
        seen.add(name)
        for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)",
                                 comps[name]):
            reach(callee, seen)

    best = None
    for carry, body in whiles:
        seen = set()
        reach(body, seen)
        top = op_counts(comps[body])
        size = len(comps[body])
        if best is None or size > best[0]:
            best = (size, carry, body, top, seen)
    _, carry, body, top, seen = best
    deep = sum((op_counts(comps[c]) for c in seen), collections.Counter())
    # ops and kernels launched by the body itself; matmuls and slices wherever they sit
    # (XLA:CPU wraps matmuls in library fusions, e.g. ``__ynn_fusion``)
    return {"loop body ops": sum(top.values()), "loop fusions": top["fusion"],
            "loop copies": top["copy"], "loop dots": deep["dot"] + deep["convolution"],
            "loop dynamic-slices": deep["dynamic-slice"] + deep["dynamic-update-slice"],
            "carried buffers": carry.count("["), "carried MiB": shape_bytes(carry) / 2**20}


def profile(name: str, img: int, batch: int, depth: int | None, reps: int,
            dump: str | None) -> list[dict]:
    overrides = {"img_size": img} | ({"depth": depth} if depth else {})
    model = revjax.models.build(name, rngs=nnx.Rngs(0), **overrides)
    graphdef, params = nnx.split(model)
    c = model.config
    images = jax.random.normal(jax.random.key(0), (batch, img, img, 3))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, c.num_classes)

    def loss(params, mode):
        return cross_entropy_loss(nnx.merge(graphdef, params)(images, mode=mode), labels)

    fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    compiled = {m: fn.lower(params, m).compile() for m in revjax.MODES}
    steps = {m: (lambda k=k: jax.block_until_ready(k(params))) for m, k in compiled.items()}
    times = interleaved_medians(steps, warmup=2, reps=reps)
    busy = {m: cores_busy(step, max(3, int(1.0 / times[m]))) for m, step in steps.items()}
    rows = []
    for m, k in compiled.items():
        hlo = k.as_text()
        if dump:
            os.makedirs(dump, exist_ok=True)
            with open(os.path.join(dump, f"{name}-{img}-{batch}-{m}.hlo"), "w") as f:
                f.write(hlo)
        ops = op_counts(hlo)
        rows.append({"mode": m, "step ms": round(1e3 * times[m], 1),
                     "vs reprop": round(times["reprop"] / times[m], 3),
                     "vs backprop": round(times["backprop"] / times[m], 3),
                     "cores busy": round(busy[m], 2),
                     "temp MiB": round(k.memory_analysis().temp_size_in_bytes / 2**20, 1),
                     "ops": sum(ops.values()), "copies": ops["copy"],
                     **{k2: (round(v, 1) if isinstance(v, float) else v)
                        for k2, v in loop_stats(hlo).items()}})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench profile",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rev-vit-s")
    ap.add_argument("--img", type=int, default=96)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dump", default=None, help="folder for the optimised HLO per mode")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    rows = profile(args.model, args.img, args.batch, args.depth, args.reps, args.dump)
    print(f"{args.model} img {args.img} batch {args.batch}")
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "rows": rows,
                                     "environment": environment()})


if __name__ == "__main__":
    main()
