"""Does this XLA:CPU run independent work at the same time? The question PaReprop rests on.

PaReprop only pays if the backend overlaps its two independent halves (layer i's VJP and the
rebuild of layer i-1). This probe asks the same question without a model: one chain of
``steps`` dependent ``tanh(x @ w)`` steps, then two independent chains of the same length in
one program, both inside a ``lax.scan`` like PaReprop's backward loop. If the backend
overlaps them, two chains take well under 2x one chain's time; if it runs them one after the
other, about 2x. With two host devices (``--xla_force_host_platform_device_count=2``) it
also runs the two chains as one SPMD program, one chain per device, handing a row across
with ``ppermute`` at every step as PaReprop's halves hand over activations and gradients:
the devices do run concurrently, so this shows what overlap across devices could give.
"Cores busy" (process CPU time / wall time over the timed calls) says the same thing
directly: near 1 for two chains means the second core sat idle.

Each XLA flag set runs in its own process (XLA reads flags once per process):

    python -m experiments.bench xla-cpu-overlap             # the default flag sets
    python -m experiments.bench xla-cpu-overlap --sizes 32 128 --out results/overlap.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from experiments.common import (atomic_write_json, cores_busy, environment,
                                interleaved_medians, table)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAG_SETS = {
    "default": "",
    "scheduler=concurrency":
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "scheduler=memory": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "single-thread ops": "--xla_cpu_multi_thread_eigen=false",
    "single-thread ops, scheduler=concurrency":
        "--xla_cpu_multi_thread_eigen=false "
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    # Two host devices: the two chains also run as one SPMD program over 2 CPU devices (each
    # device its chain, a small ppermute per step like PaReprop's hand-offs between halves).
    "two host devices": "--xla_force_host_platform_device_count=2",
}


def measure(sizes: list[int], steps: int, reps: int) -> list[dict]:
    """In this process: per width, the time of one chain and of two independent chains."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chains(xs, ws):
        """Independent chains, one per array in ``xs``, stepped together in one scan."""
        def body(xs, w):
            return tuple(jnp.tanh(x @ w) for x in xs), None
        return jax.lax.scan(body, xs, ws)[0]

    def two_devices(xs, ws):
        """Chain k on device k (SPMD over a 2-device mesh); each step hands one row across."""
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])

        def per_device(x, ws):
            def body(x, w):
                y = jnp.tanh(x[0] @ w)
                other = jax.lax.ppermute(y[:1], "d", [(0, 1), (1, 0)])
                return y.at[:1].add(0 * other)[None], None
            return jax.lax.scan(body, x, ws)[0]

        fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P()),
                                   out_specs=P("d")))
        xs = jax.device_put(xs, NamedSharding(mesh, P("d")))
        ws = jax.device_put(ws, NamedSharding(mesh, P()))
        compiled = fn.lower(xs, ws).compile()
        return lambda: jax.block_until_ready(compiled(xs, ws))

    rows = []
    for n in sizes:
        key = jax.random.key(n)
        ws = jax.random.normal(key, (steps, n, n)) / n ** 0.5
        fns = {}
        for k in (1, 2):
            xs = tuple(jax.random.normal(jax.random.fold_in(key, i), (n, n)) for i in range(k))
            compiled = chains.lower(xs, ws).compile()
            fns[k] = (lambda c=compiled, xs=xs: jax.block_until_ready(c(xs, ws)))
        if len(jax.devices()) >= 2:
            fns["devices"] = two_devices(jnp.stack(xs), ws)
        t = interleaved_medians(fns, warmup=2, reps=reps)
        busy = {k: cores_busy(fn, max(reps, int(0.5 / t[k]))) for k, fn in fns.items()}
        rows.append({"width": n, "one chain ms": round(1e3 * t[1], 3),
                     "two chains ms": round(1e3 * t[2], 3), "ratio": round(t[2] / t[1], 3),
                     "cores busy (one, two)": f"{busy[1]:.2f}, {busy[2]:.2f}"}
                    | ({"two chains, two devices: ratio (cores busy)":
                        f"{t['devices'] / t[1]:.3f} ({busy['devices']:.2f})"}
                       if "devices" in t else {}))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench xla-cpu-overlap",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--flags", nargs="*", choices=list(FLAG_SETS), default=list(FLAG_SETS))
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one flag set, already in XLA_FLAGS
        print("ROWS" + json.dumps(measure(args.sizes, args.steps, args.reps)))
        return
    rows = []
    for label in args.flags:
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), FLAG_SETS[label]]))
        out = subprocess.run([sys.executable, "-m", "experiments.probes.xla_cpu_overlap", "--child",
                              "--sizes", *map(str, args.sizes), "--steps", str(args.steps),
                              "--reps", str(args.reps)],
                             env=env, cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
        rows += [{"flags": label, **r} for r in json.loads(out.split("ROWS", 1)[1])]
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))
    if args.out:
        atomic_write_json(args.out, {"args": vars(args), "flag sets": FLAG_SETS, "rows": rows,
                                     "environment": environment()})


if __name__ == "__main__":
    main()
