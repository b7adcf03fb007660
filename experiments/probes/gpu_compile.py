"""Compile each family's training step for an NVIDIA H200 on a machine without a GPU, in
every mode, and read what the compiled program says: does it compile, XLA:GPU's memory,
and (pareprop with ``revjax.streams.GPU_STREAMS``) the simulated makespan of the scheduled loop
body over its serial sum (``revjax.gpu.stream_overlap``; 1.0: the streams' work does not
overlap).

    python -m experiments.bench gpu-compile                      # the test configs
    python -m experiments.bench gpu-compile --models rev-vit-b --batch 2 6 --img 224

Needs the CUDA compile plugin. Where this process does not see it (``make`` installs it
apart, in ``.venv/gpu-compile``, so that ``import jax`` in the venv stays quiet on CPU), the
command reruns itself in a subprocess that does (``revjax.gpu.rerun_with_plugin``). Writes
``results/gpu_compile.json`` (atomically, with versions and machine); two ``--batch`` sizes
give the per-sample figure (temp bytes slope between them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin must not be asked for a device

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import revjax  # noqa: E402
import revjax.streams  # noqa: E402
from revjax import gpu  # noqa: E402

from experiments.common import atomic_write_json, environment, table  # noqa: E402

FAMILIES = ("rev-vit-test", "rev-swin-test", "rev-mvit-test", "rev-roberta-test")
# Depth overrides that give every test config a backward loop of at least two steps.
TEST_OVERRIDES = {"rev-vit-test": {"depth": 3}, "rev-roberta-test": {"depth": 3}}
# Triton's GEMM tiling asks the device for tile sizes, which fails without one at
# realistic sizes ("Couldn't find output tile sizes"); cuBLAS GEMMs compile deviceless.
DEVICELESS_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def _inputs(model, batch: int, tokens: int):
    cfg = model.config
    if hasattr(cfg, "vocab_size"):
        ids = jnp.zeros((batch, tokens), jnp.int32)
        return ids, ids
    return (jnp.zeros((batch, cfg.img_size, cfg.img_size, 3), jnp.float32),
            jnp.zeros((batch,), jnp.int32))


def _loss(model, x, y, mode):
    logits = model(x, mode=mode).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def compile_step(name: str, mode: str, topo, *, streams: bool = False, optimizer: bool = True,
                 batch: int = 2, tokens: int = 16, region: frozenset | None = None,
                 options: dict | None = None, **overrides):
    """Compile ``name``'s training step (``optimizer``: gradient and AdamW update; else
    the gradient alone) for ``topo``'s GPU; returns the compiled program. ``region``: the
    ``revjax.streams.GPU_REGION`` to trace with (default: the library's); ``options``: XLA
    options beside the library's."""
    model = revjax.models.build(name, rngs=nnx.Rngs(0), mode=mode, **overrides)
    tx = optax.adamw(1e-3)
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = _inputs(model, batch, tokens)

    def grads(params, x, y):
        return jax.grad(lambda p: _loss(nnx.merge(gdef, p, rest), x, y, mode))(params)

    def step(params, opt_state, x, y):
        updates, opt_state = tx.update(grads(params, x, y), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    fn, args = (step, (params, tx.init(params), x, y)) if optimizer else (grads, (params, x, y))
    options = {**revjax.streams.compiler_options("cuda"), **DEVICELESS_OPTIONS, **(options or {})}
    st = revjax.streams
    saved = st.GPU_STREAMS, st.GPU_REGION
    st.GPU_STREAMS, st.GPU_REGION = streams, st.GPU_REGION if region is None else region
    try:
        return jax.jit(fn, compiler_options=options).trace(*gpu.abstract(args, topo)) \
            .lower().compile()
    finally:
        st.GPU_STREAMS, st.GPU_REGION = saved


def rerun_with_plugin(module: str, argv) -> int | None:
    """None when this process sees the CUDA plugin (go on here); otherwise the exit code of
    ``python -m module argv`` run where it is seen, or 2 (with the reason) where it is not
    installed at all."""
    try:
        return gpu.rerun_with_plugin(module, argv)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m experiments.bench gpu-compile",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(FAMILIES))
    p.add_argument("--batch", type=int, nargs="+", default=[2],
                   help="one batch size, or two for the per-sample memory slope")
    p.add_argument("--img", type=int, default=None, help="img_size override (vision)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", default="results/gpu_compile.json")
    args = p.parse_args(argv)
    rc = rerun_with_plugin("experiments.probes.gpu_compile", argv)
    if rc is not None:
        return rc
    topo = gpu.topology("h200")
    rows = []
    variants = [("backprop", False), ("reprop", False), ("pareprop", False), ("pareprop", True)]
    for name in args.models:
        over = dict(TEST_OVERRIDES.get(name, {}))
        if args.img and "roberta" not in name:
            over["img_size"] = args.img
        for mode, streams in variants:
            row = {"model": name, "mode": mode + (" +streams" if streams else ""), **over}
            temps = []
            try:
                for b in args.batch:
                    t = time.perf_counter()
                    c = compile_step(name, mode, topo, streams=streams, optimizer=False,
                                     batch=b, tokens=args.tokens, **over)
                    temps.append(c.memory_analysis().temp_size_in_bytes)
                    row["compile_s"] = round(time.perf_counter() - t, 1)
                row["compiles"] = "yes"
                row["temp_MiB"] = round(temps[0] / 2**20, 3)
                if len(temps) == 2:
                    row["MiB_per_sample"] = round(
                        (temps[1] - temps[0]) / (args.batch[1] - args.batch[0]) / 2**20, 2)
                if streams:
                    ov = gpu.stream_overlap(c.as_text())
                    row["makespan_ratio"] = None if ov["ratio"] is None else round(ov["ratio"], 3)
                    row["timeline"] = ov["timeline"][:200]
            except Exception as e:  # noqa: BLE001 (recorded, the other cells still run)
                row["compiles"] = f"no: {type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(table([row], [k for k in row if k != "timeline"]), flush=True)
    atomic_write_json(args.out, {"environment": environment(), "args": vars(args), "rows": rows})
    print(table(rows, ["model", "mode", "compiles", "temp_MiB", "MiB_per_sample",
                       "makespan_ratio"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
