"""Which way of emitting pareprop's two regions makes XLA:GPU overlap them? Compiles the
pareprop gradient for an H200 without a GPU once per mechanism and reads, from the scheduled
module, the simulated loop-body makespan over its serial sum (``revjax.gpu.stream_overlap``)
and the compiled temp memory against the same step without streams.

    python -m experiments.probes.gpu_mechanisms                       # rev-vit-test, all
    python -m experiments.probes.gpu_mechanisms --models rev-vit-b --img 224 --batch 4 \\
        --mechanisms off compute_on call
    XLA_FLAGS="--xla_gpu_command_buffer_scheduling_mode=CONCURRENT ..." \\
        python -m experiments.probes.gpu_mechanisms --mechanisms off --tag concurrent

Mechanisms (``MECHANISMS``): streams off (the reference), jax's ``compute_on``, the same
with ``operation_queue_id`` in its compiler options, the library's own region
(``revjax.streams.GPU_REGION``: ``call``) alone, with one scheduling group per pair, with
``scheduler_hint="force_delay"``, under the latency-hiding scheduler, and with the stream as
``operation_queue_id`` instead of the annotation. Flags that XLA reads only from
``XLA_FLAGS`` (command buffers) go in the environment, with ``--tag`` naming the run. Needs
the CUDA compile plugin (reruns itself where it is seen, as the gpu-compile probe does).
Writes ``results/gpu_mechanisms-<jax version>[-tag].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin must not be asked for a device

import jax  # noqa: E402

from revjax import gpu  # noqa: E402

from experiments.common import atomic_write_json, environment, table  # noqa: E402
from experiments.probes.gpu_compile import (  # noqa: E402
    TEST_OVERRIDES, compile_step, rerun_with_plugin)

LHS = {"xla_gpu_enable_latency_hiding_scheduler": True}
# name -> (GPU_STREAMS, GPU_REGION, extra XLA options)
MECHANISMS = {
    "off": (False, frozenset(), {}),
    "compute_on": (True, frozenset(), {}),
    "compute_on+lhs": (True, frozenset(), LHS),
    "compute_on+queue": (True, frozenset({"queue"}), {}),
    "compute_on+queue+lhs": (True, frozenset({"queue"}), LHS),
    "call": (True, frozenset({"call"}), {}),
    "call+lhs": (True, frozenset({"call"}), LHS),
    "call+group+lhs": (True, frozenset({"call", "group"}), LHS),
    "call+force_delay+lhs": (True, frozenset({"call", "force_delay"}), LHS),
    "call+group+force_delay": (True, frozenset({"call", "group", "force_delay"}), {}),
    "call+group+force_delay+lhs": (True, frozenset({"call", "group", "force_delay"}), LHS),
    "call+queue": (True, frozenset({"call", "queue"}), {}),
    "call+queue+lhs": (True, frozenset({"call", "queue"}), LHS),
}


def measure(name: str, mechanism: str, topo, *, batch: int, **overrides) -> dict:
    """One cell: compiles?, temp bytes, the simulated overlap and the timeline."""
    streams, region, options = MECHANISMS[mechanism]
    row = {"model": name, "mechanism": mechanism}
    t = time.perf_counter()
    try:
        c = compile_step(name, "pareprop", topo, streams=streams, optimizer=False, batch=batch,
                         region=region, options=options, **overrides)
    except Exception as e:  # noqa: BLE001 (recorded; the other cells still run)
        row["compiles"] = f"no: {type(e).__name__}: {str(e)[:300]}"
        return row
    ov = gpu.stream_overlap(c.as_text())
    row.update(compiles="yes", compile_s=round(time.perf_counter() - t, 1),
               temp_MiB=round(c.memory_analysis().temp_size_in_bytes / 2**20, 3),
               ratio=None if ov["ratio"] is None else round(ov["ratio"], 3),
               pairs=ov["pairs"], timeline=ov["timeline"][:400])
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m experiments.probes.gpu_mechanisms",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["rev-vit-test"])
    p.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS),
                   choices=list(MECHANISMS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--img", type=int, default=None, help="img_size override")
    p.add_argument("--tag", default="", help="names the run (e.g. the XLA_FLAGS it had)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rc = rerun_with_plugin("experiments.probes.gpu_mechanisms", argv)
    if rc is not None:
        return rc
    topo = gpu.topology("h200")
    rows = []
    for name in args.models:
        over = dict(TEST_OVERRIDES.get(name, {}))
        if args.img:
            over["img_size"] = args.img
        base = None
        for mech in args.mechanisms:
            row = measure(name, mech, topo, batch=args.batch, **over)
            if mech == "off":
                base = row.get("temp_MiB")
            if base and row.get("temp_MiB") is not None:
                row["memory_ratio"] = round(row["temp_MiB"] / base, 3)
            rows.append(row)
            print(table([row], [k for k in row if k not in ("timeline", "pairs")]), flush=True)
            print("   ", row.get("timeline", ""), flush=True)
    out = args.out or (f"results/gpu_mechanisms-{jax.__version__}"
                       + (f"-{args.tag}" if args.tag else "") + ".json")
    atomic_write_json(out, {"environment": environment(), "args": vars(args),
                            "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows})
    print(table(rows, ["model", "mechanism", "compiles", "temp_MiB", "memory_ratio", "ratio"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
