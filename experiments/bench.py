"""The benchmark suite: training memory, largest batch and throughput of every backward mode,
next to the standard twin and the rematerialised baselines a user would pick instead, in
JAX and PyTorch; the rebuild-drift numerics; the tables and plots.

    python -m experiments.bench demo                  # the main job (`make demo`), ~3 min CPU
    python -m experiments.bench memory --models vit-b vit-l --batches 2 6 --size 224
    python -m experiments.bench memory --models vit-l --depths 12 24 48 --batches 2
    python -m experiments.bench memory --backend gpu-compile ...   # XLA:GPU (H200), no GPU
    python -m experiments.bench speed --models vit-b swin-t --batches 2 4 --frameworks jax torch
    python -m experiments.bench report                # tables (markdown) + plots (PNG)
    python -m experiments.bench numerics ...          # rebuild drift per dtype (numerics.py)
    python -m experiments.bench {overlap,gpu-compile,parity,profile,...} ...  # see --help

A model is named by its family variant (``vit-b``, ``swin-t``, ``mvit-b``, ``roberta-base``,
``vit-test``, ...). Its methods (``--methods``):

* ``standard``: the standard twin (``vit-b``) under plain autodiff;
* ``remat`` / ``remat-dots``: the standard twin rematerialising each layer
  (``set_remat``: ``nothing_saveable`` / ``dots_with_no_batch_dims_saveable``);
* ``rev-backprop``, ``reprop``, ``pareprop``: the reversible model (``rev-vit-b``) in that
  mode; ``pareprop+streams`` (``--backend gpu-compile`` only): with ``GPU_STREAMS``.

``--depths`` sets the depth (ViT, RoBERTa) or the third stage's block count (Swin, MViT).

Measures, per cell (one method at one batch size, depth, input size and dtype):

* memory, ``--backend cpu`` (jax): XLA's compiled memory analysis of the training loss's
  gradient function (parameters and batch in, gradients out, the activations as its
  temporaries), exact with no run, plus AdamW's two moments; ``gpu-compile``: the same
  compiled for an H200 without a GPU (needs the ``gpu-compile`` extra); ``gpu``: the
  compiled analysis on the device, and the device's peak bytes in use over the library's
  training step (``revjax.train.make_train_step``). torch on CPU: bytes the forward leaves
  allocated for the backward (the CPU allocator, through ``torch.profiler``; saved tensors
  and selective checkpointing's stored outputs alike) plus parameters, gradients and AdamW's
  moments; on CUDA ``max_memory_allocated`` of a training step. (The optimizer update's own
  temporaries are left out on CPU: at small batch they are larger than a reversible model's
  activations and would hide them; the GPU peak includes them.)
* speed: samples per second of the training step (median of timed steps after warm-up,
  with the quartiles; the methods of one config run round-robin, so drift hits all alike).

Every cell is one line of ``results/bench/cells.jsonl`` (``--results``) with its config,
versions, device and date, the file rewritten atomically after each cell; a rerun skips
cells already there (``--redo`` measures them again). ``report`` derives memory per sample
(the slope over batch size), the fixed part, the largest batch in ``--budget-gib``, the
PaReprop/Reprop speed ratio, and draws the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # `--backend gpu` sets it to cuda itself

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, table  # noqa: E402

METHODS = ("standard", "remat", "remat-dots", "rev-backprop", "reprop", "pareprop")
GPU_METHODS = METHODS + ("pareprop+streams",)
REMAT = {"remat": "nothing_saveable", "remat-dots": "dots_with_no_batch_dims_saveable"}
BACKENDS = {"jax": ("cpu", "gpu-compile", "gpu"), "torch": ("cpu", "gpu")}
RESULTS, DEMO_RESULTS = "results/bench", "results/demo"
MiB = 2**20


# ----------------------------------------------------------------------------- cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement's config; ``key`` identifies it in the results file."""

    kind: str  # "memory" | "speed"
    framework: str  # "jax" | "torch"
    backend: str  # "cpu" | "gpu-compile" | "gpu"
    model: str  # family variant, e.g. "vit-b"
    method: str
    batch: int
    depth: int | None = None  # None: the variant's own
    size: int = 224  # image size, or sequence length for text models
    dtype: str = "float32"

    @property
    def key(self) -> str:
        return "|".join(str(v) for v in dataclasses.astuple(self))

    @property
    def text(self) -> bool:
        return is_text(self.model)

    def name(self) -> str:
        """The registry name of the model this method runs."""
        return self.model if self.method in ("standard", *REMAT) else f"rev-{self.model}"

    def mode(self) -> str:
        return {"rev-backprop": "backprop", "pareprop+streams": "pareprop"}.get(
            self.method, "backprop" if self.method in ("standard", *REMAT) else self.method)

    def overrides(self, variant_depths: dict) -> dict:
        out: dict = {"max_len": self.size} if self.text else {"img_size": self.size}
        if self.depth is not None:
            if "depths" in variant_depths:
                depths = list(variant_depths["depths"])
                depths[2] = self.depth
                out["depths"] = tuple(depths)
            else:
                out["depth"] = self.depth
        return out


def is_text(model: str) -> bool:
    """Text models (token ids in, sequence length as the size) by family name."""
    return model.startswith("roberta")


def default_size(model: str) -> int:
    return 128 if is_text(model) else 224


def check_cell(cell: Cell) -> None:
    if cell.framework not in BACKENDS:
        raise ValueError(f"framework must be one of {tuple(BACKENDS)}, got {cell.framework!r}")
    if cell.backend not in BACKENDS[cell.framework]:
        raise ValueError(f"backend {cell.backend!r} is not one of {cell.framework}'s "
                         f"{BACKENDS[cell.framework]}")
    allowed = GPU_METHODS if cell.backend == "gpu-compile" else METHODS
    if cell.method not in allowed:
        raise ValueError(f"method must be one of {allowed} here, got {cell.method!r}")
    if cell.kind == "speed" and cell.backend == "gpu-compile":
        raise ValueError("gpu-compile measures memory only (nothing runs)")
    if cell.batch < 1 or (cell.depth is not None and cell.depth < 1) or cell.size < 1:
        raise ValueError(f"batch, depth and size must be positive: {cell}")
    if cell.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {cell.dtype!r}")


def variant_config(framework: str, model: str) -> dict:
    """The registry's variant fields (to read its stage depths)."""
    import importlib

    family, variant = model.split("-", 1)
    mod = importlib.import_module(f"{'revjax' if framework == 'jax' else 'revtorch'}"
                                  f".models.{family}")
    return mod.VARIANTS[variant]


# ------------------------------------------------------------------------------- jax


def _jax_batch(cell: Cell, config, *, abstract: bool):
    import jax
    import jax.numpy as jnp

    b, n = cell.batch, cell.size
    if cell.text:
        shapes = [((b, n), jnp.int32), ((b, n), jnp.int32), ((b, n), jnp.bool_)]
    else:
        shapes = [((b, n, n, 3), jnp.float32), ((b,), jnp.int32)]
    if abstract:
        return tuple(jax.ShapeDtypeStruct(s, d) for s, d in shapes)
    key = jax.random.key(1)
    if cell.text:
        ids = jax.random.randint(key, (b, n), 0, config.vocab_size)
        labels = jnp.where(jax.random.uniform(key, (b, n)) < 0.15, ids, -100)
        return ids, labels, jnp.ones((b, n), bool)
    return (jax.random.normal(key, shapes[0][0]),
            jax.random.randint(key, (b,), 0, config.num_classes))


def _jax_model(cell: Cell, *, abstract: bool, optimizer: bool):
    """(model, optimizer or None) for ``cell``; ``abstract``: shapes only, nothing allocated."""
    import jax.numpy as jnp
    from flax import nnx

    import revjax
    from revjax import train

    over = cell.overrides(variant_config("jax", cell.model))
    if cell.dtype != "float32":
        over["dtype"] = getattr(jnp, cell.dtype)
    tx = train.make_optimizer(1e-4, total_steps=1000)

    def build():
        model = revjax.models.build(cell.name(), rngs=nnx.Rngs(0), mode=cell.mode(), **over)
        return model, (train.create_optimizer(model, tx) if optimizer else None)

    model, opt = nnx.eval_shape(build) if abstract else build()
    if cell.method in REMAT:
        revjax.set_remat(model, REMAT[cell.method])
    return model, opt


def jax_step(cell: Cell):
    """(jitted train step, state, batch) for ``cell``: the library's own step (AdamW)."""
    from flax import nnx

    from revjax import train

    model, optimizer = _jax_model(cell, abstract=False, optimizer=True)
    graphdef, state = nnx.split((model, optimizer))
    step = train.make_train_step(graphdef, task="mlm" if cell.text else "classification",
                                 mode=cell.mode(), donate=True)
    return step, state, _jax_batch(cell, model.config, abstract=False)


def jax_grad_fn(cell: Cell, compiler_options: dict | None = None):
    """(jitted gradient of the training loss, abstract params, abstract batch)."""
    import jax
    from flax import nnx

    import revjax.streams
    from revjax import train

    model, _ = _jax_model(cell, abstract=True, optimizer=False)
    graphdef, params = nnx.split(model)
    task = "mlm" if cell.text else "classification"

    def grads(params, batch):
        loss = lambda p: train.compute_loss(nnx.merge(graphdef, p), batch, task=task,
                                            mode=cell.mode())
        return jax.grad(loss)(params)

    options = revjax.streams.compiler_options() if compiler_options is None else compiler_options
    return (jax.jit(grads, compiler_options=options), params,
            _jax_batch(cell, model.config, abstract=True))


def _param_bytes(params) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def jax_memory(cell: Cell) -> dict:
    """The gradient function's compiled memory (parameters and batch in, gradients out,
    temporaries: the activations) plus AdamW's two moments: a training step's footprint
    without the update phase, whose temporaries hide the activations at small batch."""
    import jax

    import revjax.streams

    if cell.backend == "gpu-compile":
        from gpu_compile import DEVICELESS_OPTIONS

        from revjax import gpu

        options = {**revjax.streams.compiler_options("cuda"), **DEVICELESS_OPTIONS}
        fn, params, batch = jax_grad_fn(cell, options)
        args = gpu.abstract((params, batch), gpu.topology("h200"))
        saved, revjax.streams.GPU_STREAMS = revjax.streams.GPU_STREAMS, cell.method.endswith(
            "+streams")
        try:
            compiled = fn.trace(*args).lower().compile()
        finally:
            revjax.streams.GPU_STREAMS = saved
    else:
        fn, params, batch = jax_grad_fn(cell)
        compiled = fn.lower(params, batch).compile()
    m = compiled.memory_analysis()
    out = {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
           "output_bytes": m.output_size_in_bytes, "moments_bytes": 2 * _param_bytes(params)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          + out["moments_bytes"])
    if cell.backend == "gpu":
        step, state, batch = jax_step(cell)
        for _ in range(2):
            state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


def jax_runner(cell: Cell) -> Callable[[], None]:
    import jax

    step, state, batch = jax_step(cell)
    holder = [state]

    def run():
        holder[0], metrics = step(holder[0], batch, None)
        jax.block_until_ready(metrics)

    return run


# ----------------------------------------------------------------------------- torch


def _torch_setup(cell: Cell):
    import torch

    import revtorch
    from revtorch import train

    device = torch.device("cuda" if cell.backend == "gpu" else "cpu")
    over = cell.overrides(variant_config("torch", cell.model))
    if cell.dtype != "float32":
        over["dtype"] = getattr(torch, cell.dtype)
    torch.manual_seed(0)
    model = revtorch.models.build(cell.name(), mode=cell.mode(), **over).to(device).train()
    if cell.method in REMAT:
        revtorch.set_remat(model, REMAT[cell.method])
    opt, sched = train.make_optimizer(model, 1e-4, total_steps=1000)
    g = torch.Generator().manual_seed(1)
    b, n = cell.batch, cell.size
    if cell.text:
        ids = torch.randint(0, model.config.vocab_size, (b, n), generator=g)
        labels = torch.where(torch.rand(b, n, generator=g) < 0.15, ids, -100)
        batch = (ids, labels, torch.ones(b, n, dtype=torch.bool))
    else:
        batch = (torch.randn(b, 3, n, n, generator=g),
                 torch.randint(0, model.config.num_classes, (b,), generator=g))
    batch = tuple(t.to(device) for t in batch)
    task = "mlm" if cell.text else "classification"
    step = lambda: train.scheduled_train_step(model, opt, sched, batch, task=task)
    return model, step, batch, task


def torch_memory(cell: Cell) -> dict:
    import torch

    from revtorch import train

    model, step, batch, task = _torch_setup(cell)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if cell.backend == "gpu":
        step()  # optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"device_peak_bytes": torch.cuda.max_memory_allocated(),
                "state_bytes": 4 * state_bytes}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = train.compute_loss(model, batch, task=task, mode=None)
    loss.backward()
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    # parameters, their gradients and AdamW's two moments, next to what the forward keeps
    return {"kept_bytes": kept, "state_bytes": 4 * state_bytes,
            "total_bytes": kept + 4 * state_bytes}


def torch_runner(cell: Cell) -> Callable[[], None]:
    import torch

    _, step, _, _ = _torch_setup(cell)
    sync = torch.cuda.synchronize if cell.backend == "gpu" else (lambda: None)
    return lambda: (step(), sync())


# -------------------------------------------------------------------- results file


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save(path: str, rows: list[dict]) -> None:
    """Rewrite the JSONL through a temporary file and a rename: never half-written."""
    import tempfile

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _env_summary() -> dict:
    env = environment()
    return {k: env.get(k) for k in ("python", "jax", "jaxlib", "flax", "torch", "cpus",
                                    "machine", "jax_devices", "XLA_FLAGS")}


def record(path: str, cell: Cell, result: dict, env: dict) -> dict:
    row = {"key": cell.key, **dataclasses.asdict(cell), **result, "env": env,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows = [r for r in load(path) if r["key"] != cell.key] + [row]
    save(path, rows)
    return row


# ----------------------------------------------------------------------- running


def _max_batches(args) -> dict[tuple, int]:
    """Per (framework, backend, model, method, depth, size, dtype): the largest batch that
    fits ``--max-batch-gib`` by the memory cells already recorded (capped)."""
    import report

    rows = report.memory_table(load(args.results_file), args.max_batch_gib)
    return {(r["framework"], r["backend"], r["model"], r["method"], r["depth"], r["size"],
             r["dtype"]): min(r["max batch"], args.max_batch_cap)
            for r in rows if r["max batch"] and r["max batch"] > 0}


def _grid(args, kind: str) -> list[Cell]:
    """The cells of ``args``' grid; with ``--max-batch-gib`` each method at its largest batch
    from the memory cells recorded (methods without them are left out)."""
    fits = _max_batches(args) if getattr(args, "max_batch_gib", None) else None
    cells = []
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
                        cells.append(cell)
    return cells


def _progress(cells, desc):
    from tqdm import tqdm

    return tqdm(cells, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)


def run_memory(args) -> list[dict]:
    done = {r["key"] for r in load(args.results_file)}
    env, rows = _env_summary(), []
    for cell in _progress(_grid(args, "memory"), "memory"):
        if cell.key in done and not args.redo:
            continue
        t = time.perf_counter()
        try:
            result = (jax_memory if cell.framework == "jax" else torch_memory)(cell)
        except Exception as e:  # noqa: BLE001 (recorded; the other cells still run)
            result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(record(args.results_file, cell, result, env))
    return rows


def run_speed(args) -> list[dict]:
    """Cells that differ only in method are timed together, round-robin."""
    done = {r["key"] for r in load(args.results_file)}
    env, rows = _env_summary(), []
    groups: dict[tuple, list[Cell]] = {}
    for cell in _grid(args, "speed"):
        if cell.key not in done or args.redo:
            groups.setdefault(dataclasses.replace(cell, method="").key, []).append(cell)
    for cells in _progress(list(groups.values()), "speed"):
        runners, errors = {}, {}
        for cell in cells:
            try:
                runners[cell] = (jax_runner if cell.framework == "jax" else torch_runner)(cell)
                for _ in range(args.warmup):
                    runners[cell]()
            except Exception as e:  # noqa: BLE001
                runners.pop(cell, None)
                errors[cell] = f"{type(e).__name__}: {str(e)[:300]}"
        times: dict[Cell, list[float]] = {c: [] for c in runners}
        for _ in range(args.reps):
            for cell, run in runners.items():
                t = time.perf_counter()
                run()
                times[cell].append(time.perf_counter() - t)
        for cell in cells:
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


# ------------------------------------------------------------------------ commands


def _add_grid_args(p, *, methods=METHODS, batches=(2, 4)):
    p.add_argument("--frameworks", nargs="+", default=["jax"], choices=tuple(BACKENDS))
    p.add_argument("--backend", default="cpu", choices=("cpu", "gpu-compile", "gpu"))
    p.add_argument("--models", nargs="+", default=["vit-test"])
    p.add_argument("--methods", nargs="+", default=list(methods), choices=GPU_METHODS)
    p.add_argument("--batches", nargs="+", type=int, default=list(batches))
    p.add_argument("--depths", nargs="+", type=int, default=None)
    p.add_argument("--size", type=int, default=None,
                   help="image size (vision; default 224) or sequence length (text; 128)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--redo", action="store_true", help="measure cells already recorded")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None,
                    help=f"folder of cells.jsonl and plots (default {RESULTS}; demo: "
                    f"{DEMO_RESULTS})")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_grid_args(sub.add_parser("memory", help="training-step memory cells"))
    sp = sub.add_parser("speed", help="training-step throughput cells")
    _add_grid_args(sp)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--reps", type=int, default=5)
    sp.add_argument("--max-batch-gib", type=float, default=None,
                    help="instead of --batches: each method at its largest batch in this "
                    "many GiB, from the memory cells already recorded")
    sp.add_argument("--max-batch-cap", type=int, default=1024)
    rp = sub.add_parser("report", help="tables and plots from the results")
    rp.add_argument("--budget-gib", type=float, default=80.0)
    dp = sub.add_parser("demo", help="the small default run: memory, speed, report")
    dp.add_argument("--smoke", action="store_true", help="the smallest configs (tests)")
    for name, (module, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=f"{help_} (experiments/{module}.py; its own flags)",
                       add_help=False)
    return ap


# The main job: the memory cells are exact compiles (no run), the speed cells short.
DEMO_MEMORY = dict(models=["vit-s"], size=64, batches=[2, 4], depths=[4, 12],
                   methods=["standard", "remat", "reprop", "pareprop"])
DEMO_SPEED = dict(models=["vit-s"], size=64, batches=[4], frameworks=["jax", "torch"],
                  methods=["standard", "remat", "reprop", "pareprop"])
SMOKE = dict(models=["vit-test"], size=32, batches=[2, 3], depths=[2, 3])


def demo(args) -> None:
    base = parser()
    mem = dict(SMOKE if args.smoke else DEMO_MEMORY)
    speed = dict(SMOKE if args.smoke else DEMO_SPEED)
    speed.update(batches=speed["batches"][:1], depths=None)
    if args.smoke:
        speed.update(frameworks=["jax", "torch"], methods=["standard", "remat", "pareprop"])

    def ns(command, **kw):
        argv = ["--results", args.results, command]
        parsed = base.parse_args(argv)
        for k, v in kw.items():
            setattr(parsed, k, v)
        parsed.results_file = os.path.join(args.results, "cells.jsonl")
        return parsed

    run_memory(ns("memory", **mem))
    run_memory(ns("memory", **{**mem, "frameworks": ["torch"], "depths": mem["depths"][:1]}))
    run_speed(ns("speed", **speed, warmup=1 if args.smoke else 2,
                 reps=2 if args.smoke else 5))
    import report

    report.main(["--results", args.results])


# The suite's other experiments, each its own module with ``main(argv)``, run as sub-commands.
SUBCOMMANDS = {
    "numerics": ("numerics", "rebuild drift per dtype, precision policy, anchors"),
    "overlap": ("overlap", "GPU stream overlap of pareprop from profiler traces"),
    "gpu-compile": ("gpu_compile", "compile every family and mode for an H200, no GPU"),
    "parity": ("parity_report", "revjax vs revtorch outputs and gradients, per case"),
    "profile": ("profile_modes", "where each mode spends its time (XLA:CPU)"),
    "pareprop-cpu": ("pareprop_cpu", "PaReprop vs Reprop on XLA:CPU, flag variants"),
    "xla-cpu-overlap": ("xla_cpu_overlap", "does XLA:CPU overlap two independent chains"),
    "params": ("param_counts", "parameter counts of every registered model"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = 2 if argv[:1] == ["--results"] else 0  # the other experiments have their own --out
    if len(argv) > first and argv[first] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(SUBCOMMANDS[argv[first]][0])
        out = module.main(argv[first + 1:])
        return out if isinstance(out, int) else 0
    args = parser().parse_args(argv)
    args.results = args.results or (DEMO_RESULTS if args.command == "demo" else RESULTS)
    args.results_file = os.path.join(args.results, "cells.jsonl")
    if args.command == "memory":
        rows = run_memory(args)
    elif args.command == "speed":
        rows = run_speed(args)
    elif args.command == "report":
        import report

        return report.main(["--results", args.results, "--budget-gib", str(args.budget_gib)])
    else:
        demo(args)
        return 0
    cols = ["framework", "backend", "model", "method", "batch", "depth", "size", "dtype"]
    extra = ["total_bytes", "temp_bytes", "kept_bytes", "device_peak_bytes", "samples_per_s",
             "error"]
    print(table(rows, cols + [c for c in extra if any(c in r for r in rows)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
