"""Numerics of the reversible backward: rebuild drift and gradient error per precision, with
and without the float32-stream policy and anchors (revjax).

    python -m experiments.bench numerics            # default grid, a few minutes on 2 cores
    python -m experiments.bench numerics --smoke    # ~30 s

For Rev-ViT (width 64, 4 heads, 16x16 digits-sized images, patch 4: 16 tokens) at depths
4..24, Rev-Swin (``rev-swin-test``) and Rev-RoBERTa (``rev-roberta-test``), with the models'
own random initialisation, and for Rev-ViT also after ``--train-steps`` AdamW steps on
scikit-learn's digits (float32, ``revjax.train``): per compute dtype (float32, bfloat16,
float16; parameters float32 throughout), policy (none / ``stream_dtype="float32"``) and
anchors (none, k=2, k=4):

* ``rebuild``: the per-layer relative error of the inputs the backward rebuilds against the
  stored ones (``revjax.check_rebuilds`` around one eager forward; max over the two streams,
  ``max|rebuilt - stored| / max|stored|``); ``rebuild_max`` is the worst layer.
* ``grad_vs_backprop``: ``||g_mode - g_backprop|| / ||g_backprop||`` (all parameter
  gradients as one vector) with backprop in the same dtype and policy, for reprop/pareprop;
* ``grad_vs_f64``: the same against a float64 backprop reference (float64 parameters and
  compute), for backprop, reprop and pareprop; ``grad_vs_f32``: against float32 backprop.
* ``temp_mib``: the compiled gradient's temporary bytes (XLA memory analysis), for the
  anchor trade-off.

Writes ``results/numerics/numerics.json`` (rows, config, versions), ``numerics.jsonl`` (a
row per line) and ``numerics.png`` (error vs depth per dtype), atomically; prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from experiments.common import atomic_write_json, environment, table

DTYPES = ("float32", "bfloat16", "float16")
VIT = dict(dim=64, heads=4, img_size=16, patch_size=4, num_classes=10)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench numerics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a ~40 s grid (Rev-ViT depth 2, "
                   "float32 and bfloat16, k=1; no training, Swin or RoBERTa)")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24],
                   help="Rev-ViT depths")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--anchors", type=int, nargs="+", default=[2, 4],
                   help="anchor_every values (measured at the largest depth)")
    p.add_argument("--train-steps", type=int, default=200,
                   help="AdamW steps on digits for the trained Rev-ViT (0: none)")
    p.add_argument("--train-depth", type=int, default=12)
    p.add_argument("--families", nargs="+", default=["vit", "swin", "roberta"],
                   choices=["vit", "swin", "roberta"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/numerics")
    return p


# ------------------------------------------------------------------------ the models

def _jnp_dtype(name):
    import jax.numpy as jnp

    return jnp.dtype(name)


class Subject:
    """One model (name + overrides), its float32 parameters and a batch."""

    def __init__(self, label, name, overrides, params, batch, task):
        self.label, self.name, self.overrides = label, name, overrides
        self.params, self.batch, self.task = params, batch, task

    def variant(self, dtype, stream=None, anchor=None):
        """(graphdef, params) for compute ``dtype`` (parameters float32; float64: both)."""
        import jax
        from flax import nnx

        import revjax

        pdt = "float64" if dtype == "float64" else "float32"
        abstract = nnx.eval_shape(lambda: revjax.models.build(
            self.name, rngs=nnx.Rngs(0), dtype=_jnp_dtype(dtype),
            param_dtype=_jnp_dtype(pdt), stream_dtype=stream, anchor_every=anchor,
            **self.overrides))
        graphdef, _ = nnx.split(abstract)
        params = jax.tree.map(lambda a: a.astype(pdt) if a.dtype.kind == "f" else a,
                              self.params)
        return graphdef, params


def _loss(graphdef, task, mode):
    from flax import nnx

    from revjax.train import compute_loss

    def loss(params, batch):
        return compute_loss(nnx.merge(graphdef, params), batch, task=task, mode=mode)

    return loss


def _grads(subject, dtype, modes, stream=None, anchor=None):
    """({mode: flat float64 gradient vector}, per-layer rebuild errors of every RevStack
    call, stage after stage): all modes in one compiled program, the errors reported from it
    by ``revjax.check_rebuilds``."""
    import jax

    import revjax

    graphdef, params = subject.variant(dtype, stream, anchor)
    losses = {m: _loss(graphdef, subject.task, m) for m in modes}
    batch = subject.batch
    if dtype == "float64":
        batch = jax.tree.map(lambda a: a.astype("float64") if a.dtype.kind == "f" else a,
                             batch)
    with revjax.check_rebuilds(threshold=np.inf, on_error="warn") as reports:
        fn = jax.jit(lambda p, b: {m: jax.grad(loss)(p, b) for m, loss in losses.items()})
        out = jax.block_until_ready(fn(params, batch))
    calls = sorted(reports, key=lambda r: r["call"])[:len(reports) // len(modes)]
    errors = np.concatenate([np.asarray(r["errors"], np.float64) for r in calls])
    grads = {m: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
             for m, g in out.items()}
    return grads, errors


def _temp_mib(subject, dtype, mode, stream=None, anchor=None):
    """Temporary bytes (MiB) of the compiled gradient of ``mode`` (XLA memory analysis)."""
    import jax

    graphdef, params = subject.variant(dtype, stream, anchor)
    fn = jax.jit(jax.grad(_loss(graphdef, subject.task, mode)))
    compiled = fn.lower(params, subject.batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _init(name, overrides, seed):
    """Parameters drawn on the host as the models initialise them (truncated normal, std
    0.02, cut at 2 std, for weights and embeddings; zero biases; LayerNorm scale 1): the
    models' own initialisers compile a program per shape (slow on 2 cores)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import revjax

    rng = np.random.default_rng(seed)
    state = nnx.state(nnx.eval_shape(lambda: revjax.models.build(
        name, rngs=nnx.Rngs(0), **overrides)))

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        if "['scale']" in key:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "['bias']" in key or leaf.ndim < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(np.clip(rng.normal(size=leaf.shape), -2, 2) * 0.02, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, state)


def vit_subject(depth, args, params=None, label="random"):
    import jax.numpy as jnp

    from experiments.train import data as data_lib

    overrides = dict(args.vit, depth=depth)
    data = data_lib.load("digits", img_size=args.vit["img_size"])
    batch = (jnp.asarray(data.test.x[:args.batch]), jnp.asarray(data.test.y[:args.batch]))
    params = _init("rev-vit-test", overrides, args.seed) if params is None else params
    return Subject(label, "rev-vit-test", overrides, params, batch, "classification")


def trained_vit(args):
    """Rev-ViT at ``--train-depth`` after ``--train-steps`` AdamW steps on digits (float32)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import revjax
    from revjax import train

    from experiments.train import data as data_lib

    overrides = dict(args.vit, depth=args.train_depth)
    model = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(args.seed), **overrides)
    optimizer = train.create_optimizer(model, train.make_optimizer(1e-3, args.train_steps))
    graphdef, state = nnx.split((model, optimizer))
    step = train.make_train_step(graphdef, mode="pareprop")
    data = data_lib.load("digits", img_size=args.vit["img_size"])
    losses = []
    for s in range(args.train_steps):
        idx = data_lib.batch_indices(len(data.train.y), 64, args.seed, s)
        state, metrics = step(state, (jnp.asarray(data.train.x[idx]),
                                      jnp.asarray(data.train.y[idx])), None)
        losses.append(float(metrics["loss"]))
    model, _ = nnx.merge(graphdef, state)
    subject = vit_subject(args.train_depth, args, nnx.state(model),
                          label=f"trained {args.train_steps} steps")
    logits = nnx.merge(*nnx.split(model))(subject.batch[0])
    accuracy = float((logits.argmax(-1) == subject.batch[1]).mean())
    scale = {"first_loss": losses[0] if losses else None,
             "last_loss": losses[-1] if losses else None, "test_batch_accuracy": accuracy,
             "max_abs_param": float(max(jnp.max(jnp.abs(a))
                                        for a in jax.tree.leaves(nnx.state(model))))}
    return subject, scale


def family_subject(family, args):
    import jax
    import jax.numpy as jnp

    from revjax.mlm import IGNORE

    name = f"rev-{family}-test"
    if family == "swin":
        overrides = {}
        x = jax.random.normal(jax.random.key(1), (args.batch // 2, 32, 32, 3))
        batch = (x, jnp.arange(args.batch // 2) % 10)
        task = "classification"
    else:
        overrides = {}
        ids = jax.random.randint(jax.random.key(1), (args.batch // 2, 16), 2, 100)
        labels = jnp.where(jnp.arange(16) % 5 == 0, ids, IGNORE)
        batch, task = (ids, labels, None), "mlm"
    return Subject("random", name, overrides, _init(name, overrides, args.seed), batch, task)


# --------------------------------------------------------------------- measurements

def measure(subject, args, *, anchors=(), pareprop=True, memory=False):
    """Rows for one subject: every dtype x policy, and anchors without the policy (with it
    the rebuild is already exact here). The float32 backprop gradient is the first row's."""
    import jax

    rows = []
    with jax.enable_x64(True):
        ref64 = _grads(subject, "float64", ["backprop"])[0]["backprop"]
    ref32 = None
    depth = subject.overrides.get("depth")
    for dtype in args.dtypes:
        for stream in ([None] if dtype == "float32" else [None, "float32"]):
            with_anchors = stream is None and not (args.smoke and dtype == "float32")
            for anchor in (None, *(anchors if with_anchors else ())):
                modes = ["backprop", "reprop"] + (["pareprop"] if pareprop else [])
                g, errors = _grads(subject, dtype, modes, stream, anchor)
                back = g.pop("backprop")
                if ref32 is None:
                    assert dtype == "float32" and anchor is None
                    ref32 = back
                row = dict(model=subject.name, weights=subject.label,
                           depth=depth or len(errors),  # Swin: all stages' layers
                           dtype=dtype, policy="f32 streams" if stream else "none",
                           anchor_every=anchor,
                           backprop_vs_f64=_rel(back, ref64), backprop_vs_f32=_rel(back, ref32))
                for mode, gm in g.items():
                    row[f"{mode}_vs_backprop"] = _rel(gm, back)
                    row[f"{mode}_vs_f64"] = _rel(gm, ref64)
                    row[f"{mode}_vs_f32"] = _rel(gm, ref32)
                if memory and dtype == "float32":
                    row["temp_mib"] = _temp_mib(subject, dtype, "reprop", stream, anchor)
                    if anchor is None:
                        row["backprop_temp_mib"] = _temp_mib(subject, dtype, "backprop")
                row["rebuild"] = [float(e) for e in errors]
                row["rebuild_max"] = float(np.max(errors))
                rows.append(row)
                print(_short(row), flush=True)
    return rows


def _short(row):
    keys = ("model", "weights", "depth", "dtype", "policy", "anchor_every", "rebuild_max",
            "backprop_vs_f32", "reprop_vs_backprop", "reprop_vs_f32")
    return " ".join(f"{k}={_fmt(row.get(k))}" for k in keys)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2e}"
    return "" if v is None else str(v)


# ------------------------------------------------------------------------- reporting

def tables(rows) -> str:
    cols = ["model", "weights", "depth", "dtype", "policy", "anchor_every", "rebuild_max",
            "backprop_vs_f32", "reprop_vs_f32", "pareprop_vs_f32", "reprop_vs_backprop",
            "pareprop_vs_backprop", "backprop_vs_f64", "reprop_vs_f64", "temp_mib"]
    return table([{c: _fmt(r.get(c)) for c in cols} for r in rows], cols)


def targets(rows) -> list[dict]:
    """The targets, per (model, weights, depth, dtype below float32)."""
    out = []
    index = {(r["model"], r["weights"], r["depth"], r["dtype"], r["policy"],
              r["anchor_every"]): r for r in rows}
    for (model, weights, depth, dtype, policy, anchor), r in index.items():
        if policy != "f32 streams" or anchor is not None:
            continue
        plain = index[(model, weights, depth, dtype, "none", None)]
        for mode in ("reprop", "pareprop"):
            if f"{mode}_vs_f32" not in r:
                continue
            out.append(dict(model=model, weights=weights, depth=depth, dtype=dtype, mode=mode,
                            policy_vs_f32=r[f"{mode}_vs_f32"],
                            plain_mode_vs_f32=plain[f"{mode}_vs_f32"],
                            backprop_vs_f32=plain["backprop_vs_f32"],
                            met=r[f"{mode}_vs_f32"] <= plain["backprop_vs_f32"]))
    return out


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vit = [r for r in rows if r["model"] == "rev-vit-test" and r["weights"] == "random"]
    dtypes = sorted({r["dtype"] for r in vit}, key=DTYPES.index)
    fig, axes = plt.subplots(2, len(dtypes), figsize=(4.2 * len(dtypes), 7), squeeze=False)
    for j, dtype in enumerate(dtypes):
        ax = axes[0][j]
        for policy in ("none", "f32 streams"):
            sel = sorted((r for r in vit if r["dtype"] == dtype and r["policy"] == policy
                          and r["anchor_every"] is None), key=lambda r: r["depth"])
            if not sel:
                continue
            d = [r["depth"] for r in sel]
            if dtype != "float32":  # float32 backprop is the reference itself
                ax.plot(d, [r["backprop_vs_f32"] for r in sel], ":", marker=".",
                        label=f"backprop grad ({policy})")
            ax.plot(d, [r["reprop_vs_f32"] for r in sel], marker="o",
                    label=f"reprop grad ({policy})")
            ax.plot(d, [max(r["rebuild_max"], 1e-12) for r in sel], "--", marker="x",
                    label=f"rebuild max ({policy})")
        ax.set(title=f"Rev-ViT {dtype}: error vs depth", xlabel="depth", yscale="log",
               ylabel="relative error (1e-12: exact)")
        ax.legend(fontsize=6)
        ax = axes[1][j]
        deep = max(r["depth"] for r in vit)
        for r in vit:
            if r["dtype"] == dtype and r["depth"] == deep:
                e = np.asarray(r["rebuild"])
                through = deep - np.arange(len(e))
                if r["anchor_every"]:  # anchored layers are exact: show the others
                    keep = np.arange(len(e)) % r["anchor_every"] != 0
                    e, through = e[keep], through[keep]
                ax.plot(through, np.maximum(e, 1e-12), marker=".", lw=0.8,
                        label=f"{r['policy']}, k={r['anchor_every']}")
        ax.set(title=f"depth {deep}, {dtype}: rebuild error per layer",
               xlabel="layers rebuilt through (from the top)", yscale="log",
               ylabel="rebuilt input error (1e-12: exact)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_jsonl(path, rows) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    for v in (*args.depths, args.train_depth):
        if v < 1:
            raise SystemExit(f"depths must be positive, got {v}")
    if any(k < 1 for k in args.anchors):
        raise SystemExit("anchor_every values must be at least 1")
    if args.dtypes[0] != "float32":
        raise SystemExit("--dtypes must start with float32 (the float32 backprop reference)")
    args.vit = dict(VIT)
    if args.smoke:
        args.depths, args.dtypes, args.anchors = [2], ["float32", "bfloat16"], [1]
        args.train_steps, args.families = 0, ["vit"]
        args.batch = 8
        args.vit.update(dim=32, heads=2)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    rows, extra = [], {}
    if "vit" in args.families:
        for depth in args.depths:
            deepest = depth == max(args.depths)
            rows += measure(vit_subject(depth, args), args, memory=deepest and not args.smoke,
                            anchors=args.anchors if deepest else (),
                            pareprop=deepest and not args.smoke)
        if args.train_steps:
            subject, extra["trained_vit"] = trained_vit(args)
            rows += measure(subject, args, anchors=args.anchors, pareprop=False)
    for family in args.families:
        if family != "vit":
            rows += measure(family_subject(family, args), args, pareprop=False)
    goals = targets(rows)
    payload = {"config": vars(args),
               "environment": environment(), "seconds": time.time() - t0, "rows": rows,
               "targets": goals, **extra}
    atomic_write_json(os.path.join(args.out, "numerics.json"), payload)
    _atomic_jsonl(os.path.join(args.out, "numerics.jsonl"), rows)
    plot(rows, os.path.join(args.out, "numerics.png"))
    print(tables(rows))
    print()
    print(table([{k: _fmt(v) for k, v in g.items()} for g in goals],
                ["model", "weights", "depth", "dtype", "mode", "policy_vs_f32",
                 "plain_mode_vs_f32", "backprop_vs_f32", "met"]))
    print(f"\n{time.time() - t0:.0f} s; wrote {args.out}/numerics.json, numerics.jsonl, "
          "numerics.png")
    return payload


if __name__ == "__main__":
    main()
