"""The main job: compare the three backward modes of Rev-ViT on this machine.

For each config: gradient-step time per mode (median of interleaved runs after warm-up),
compiled temp memory of the gradient function per mode at two depths, and the largest
relative gradient difference of reprop/pareprop against backprop.

    python experiments/demo.py                     # small default configs, CPU, ~2 min
    python experiments/demo.py --configs rev-vit-s:img=224:batch=8
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atomic_write_json, environment, interleaved_medians, table  # noqa: E402

import revjax  # noqa: E402
from revjax.train import cross_entropy_loss  # noqa: E402

DEFAULT_CONFIGS = ("rev-vit-test:img=32:batch=8", "rev-vit-s:img=64:batch=4")


def parse(spec: str) -> dict:
    """``name:key=value:...`` -> dict(name=..., img=..., batch=..., depth=...)."""
    name, *kvs = spec.split(":")
    out = {"name": name}
    for kv in kvs:
        k, v = kv.split("=")
        out[k] = int(v)
    return out


def grad_fn(name: str, img: int, depth: int | None):
    """A jitted ``(params, images, labels, mode) -> (loss, grads)`` for a fresh model."""
    overrides = {"img_size": img} | ({"depth": depth} if depth else {})
    model = revjax.models.build(name, rngs=nnx.Rngs(0), **overrides)
    graphdef, params = nnx.split(model)

    def loss(params, images, labels, mode):
        return cross_entropy_loss(nnx.merge(graphdef, params)(images, mode=mode), labels)

    fn = jax.jit(jax.value_and_grad(loss), static_argnums=3)
    return fn, params, model.config


def run_config(spec: dict, reps: int) -> list[dict]:
    fn, params, config = grad_fn(spec["name"], spec["img"], spec.get("depth"))
    batch = spec.get("batch", 8)
    key = jax.random.key(0)
    images = jax.random.normal(key, (batch, config.img_size, config.img_size, 3))
    labels = jax.random.randint(key, (batch,), 0, config.num_classes)
    compiled = {m: fn.lower(params, images, labels, m).compile() for m in revjax.MODES}
    grads = {m: compiled[m](params, images, labels)[1] for m in revjax.MODES}
    times = interleaved_medians(
        {m: (lambda c=c: jax.block_until_ready(c(params, images, labels)))
         for m, c in compiled.items()}, warmup=2, reps=reps)
    half = max(1, config.depth // 2)
    fn_half, params_half, _ = grad_fn(spec["name"], spec["img"], half)
    rows = []
    for m in revjax.MODES:
        ref = jax.tree.leaves(grads["backprop"])
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                   for a, b in zip(jax.tree.leaves(grads[m]), ref))
        mem_half = fn_half.lower(params_half, images, labels, m).compile()
        rows.append({
            "model": f"{spec['name']} {config.img_size}px b{batch}",
            "mode": m,
            "step ms": f"{1e3 * times[m]:.1f}",
            "vs backprop": f"{times['backprop'] / times[m]:.2f}x",
            f"temp MiB (depth {half})":
                f"{mem_half.memory_analysis().temp_size_in_bytes / 2**20:.1f}",
            "temp MiB (depth {})".format(config.depth):
                f"{compiled[m].memory_analysis().temp_size_in_bytes / 2**20:.1f}",
            "max grad rel diff": f"{diff:.1e}",
        })
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="results/demo.json")
    args = ap.parse_args(argv)
    all_rows = []
    for spec in map(parse, args.configs):
        rows = run_config(spec, args.reps)
        cols = list(rows[0])
        print(table(rows, cols), "\n", flush=True)
        all_rows += rows
    atomic_write_json(args.out, {"configs": args.configs, "rows": all_rows,
                                 "environment": environment()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
