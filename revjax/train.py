"""Training pieces for ``revjax.models``: optimizer, compiled train/eval steps, sharding.

- ``make_optimizer``: AdamW with linear warm-up + cosine decay and global-norm clipping
  (optax), wrapped by ``create_optimizer`` in an ``nnx.Optimizer`` over the ``nnx.Param`` s.
- ``make_train_step`` / ``make_eval_step``: pure functions of the split ``(model,
  optimizer)`` state (``nnx.split``), compiled with ``jax.jit``, for ``task``
  ``"classification"`` (images, labels) or ``"mlm"`` (inputs, labels, padding mask;
  ``revjax.mlm``), each with a backward ``mode``. On CPU they compile with
  ``revjax.CPU_COMPILER_OPTIONS`` (``revjax.streams.compiler_options``: pareprop's carried
  residuals are not copied every layer).
- Devices: ``data_parallel`` (batch over the mesh axis, state replicated) and ``fsdp`` (state
  sharded too, each array along a dimension the axis size divides) give the shardings the
  steps are compiled with; the custom VJP runs inside the one jitted program. Meshes may
  use ``AxisType.Auto`` or ``AxisType.Explicit`` axes (``Manual`` is refused clearly).
- ``train_step(model, optimizer, images, labels, *, mode=None, rngs=None)``: the one-call
  classification step of the README's quick start (same compiled program, cached).

Mixed precision: build the model with ``dtype=jnp.bfloat16`` (compute) and the default
``param_dtype`` float32; the losses are computed in float32.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .streams import compiler_options
from .stack import layer_ndim

TASKS = ("classification", "mlm")


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, computed in float32 (or wider)."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(dtype), labels).mean()


# ----------------------------------------------------------------------- optimizer


def make_optimizer(learning_rate: float, total_steps: int, *, warmup_steps: int | None = None,
                   weight_decay: float = 0.05, clip_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999,
                   end_learning_rate: float = 0.0) -> optax.GradientTransformation:
    """AdamW whose learning rate rises linearly from 0 over ``warmup_steps`` (default 10% of
    ``total_steps``) to ``learning_rate`` and decays by a cosine to ``end_learning_rate`` at
    ``total_steps``; gradients are clipped to global norm ``clip_norm`` first (None: no
    clipping). Weight decay applies to matrices only (a layer's ndim >= 2, the depth axis of
    stacked layers not counted), not to biases or norm scales, as ``revtorch.train``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    schedule = _schedule(learning_rate, total_steps, warmup_steps, end_learning_rate)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                        mask=_LayerMatrices())
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


class _LayerMatrices:
    """Weight-decay mask: True for leaves whose layer slice is a matrix (``layer_ndim >= 2``).

    optax calls it with the ``nnx.Variable`` s at ``init`` (their metadata marks stacked
    layers) and with plain arrays at ``update``; the flags found at ``init`` are kept per tree
    structure for the updates (without them: ``ndim >= 2``)."""

    def __init__(self):
        self.flags: dict = {}

    def __call__(self, tree):
        is_var = lambda x: isinstance(x, nnx.Variable)
        leaves, treedef = jax.tree.flatten(tree, is_leaf=is_var)
        if any(map(is_var, leaves)):
            flags = [layer_ndim(x) >= 2 for x in leaves]
            plain = jax.tree.structure(jax.tree.map(lambda v: v.value, tree, is_leaf=is_var))
            self.flags[plain] = flags
            return treedef.unflatten(flags)
        flags = self.flags.get(treedef) or [jnp.ndim(x) >= 2 for x in leaves]
        return treedef.unflatten(flags)


def create_optimizer(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` over the model's ``nnx.Param`` s."""
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def learning_rate(tx_schedule_step: int, learning_rate: float, total_steps: int,
                  warmup_steps: int | None = None, end_learning_rate: float = 0.0) -> float:
    """The learning rate ``make_optimizer`` uses at a step (for logging)."""
    return float(_schedule(learning_rate, total_steps, warmup_steps,
                           end_learning_rate)(tx_schedule_step))


def _schedule(learning_rate: float, total_steps: int, warmup_steps: int | None,
              end_learning_rate: float) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps`` (default 10% of ``total_steps``), then a
    cosine decay to ``end_learning_rate`` at ``total_steps``."""
    warmup = max(1, total_steps // 10) if warmup_steps is None else warmup_steps
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup}")
    def schedule(count):
        # optax.warmup_cosine_decay_schedule(0, lr, warmup, total, end), in the default float
        # dtype (float64 under x64: optax's is float32 there)
        c = jnp.asarray(count, jnp.result_type(float))
        t = jnp.clip((c - warmup) / (total_steps - warmup), 0.0, 1.0)
        cosine = end_learning_rate + (learning_rate - end_learning_rate) * 0.5 * (
            1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(c < warmup, learning_rate * c / max(warmup, 1), cosine)

    return schedule


# ------------------------------------------------------------------------- losses


def compute_loss(model: nnx.Module, batch: tuple, *, task: str, mode: str | None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
    """The task's loss on a batch: classification ``(images, labels)`` -> mean cross-entropy;
    mlm ``(inputs, labels, mask)`` -> ``model.loss`` (``revjax.mlm.head_loss``: the loss
    without the full logits; mask: padding, may be None)."""
    if task == "classification":
        images, labels = batch
        return cross_entropy_loss(model(images, mode=mode, rngs=rngs), labels)
    if task == "mlm":
        inputs, labels, mask = batch
        return model.loss(inputs, labels, mask, mode=mode, rngs=rngs)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ----------------------------------------------------------------------- sharding


def check_mesh(mesh: Mesh | None, axis: str) -> None:
    """Meshes must name ``axis`` and use ``AxisType.Auto`` or ``AxisType.Explicit`` axes
    (the steps run their body under ``jax.sharding.auto_axes`` on explicit meshes)."""
    if mesh is None:
        return
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no {axis!r} axis; pass "
                         f"axis=<one of {mesh.axis_names}>")
    manual = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual]
    if manual:
        raise ValueError(
            f"mesh axes {manual} are AxisType.Manual: revjax's train steps shard with "
            "XLA's propagation; build the mesh with jax.make_mesh(shape, names, "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(names)) (or Explicit)")


def _explicit(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def make_mesh(num_devices: int | None = None, axis: str = "data",
              axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default all)."""
    n = num_devices or jax.device_count()
    return jax.make_mesh((n,), (axis,), axis_types=(axis_type,),
                         devices=jax.devices()[:n])


def _fsdp_spec(shape: tuple[int, ...], size: int, axis: str) -> P:
    """Shard the largest dimension that ``size`` divides; replicate small/indivisible ones."""
    dims = [i for i in np.argsort(shape)[::-1] if shape[i] % size == 0 and shape[i] >= size]
    if not dims:
        return P()
    spec = [None] * len(shape)
    spec[int(dims[0])] = axis
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh, *, fsdp: bool, axis: str = "data") -> Any:
    """NamedShardings for every array of ``state`` (a pytree, e.g. ``nnx.split`` 's state):
    replicated (data parallel) or FSDP (each array sharded over ``axis`` along its largest
    dimension that the axis size divides; scalars and indivisible arrays replicated)."""
    check_mesh(mesh, axis)
    size = mesh.shape[axis]

    def one(x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, _fsdp_spec(shape, size, axis) if fsdp else P())

    return jax.tree.map(one, state)


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Batch (leading) dimension split over ``axis``."""
    check_mesh(mesh, axis)
    return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class Shardings(NamedTuple):
    """What a step is compiled with: the state's, the batch's and the replicated one."""
    state: Any
    batch: NamedSharding
    replicated: NamedSharding


def data_parallel(state: Any, mesh: Mesh, axis: str = "data") -> Shardings:
    """Data parallel: batch split over ``axis``, parameters and optimizer state replicated."""
    return Shardings(state_shardings(state, mesh, fsdp=False, axis=axis),
                     batch_sharding(mesh, axis), replicated(mesh))


def fsdp(state: Any, mesh: Mesh, axis: str = "data") -> Shardings:
    """Fully sharded: batch, parameters and optimizer state all split over ``axis``."""
    return Shardings(state_shardings(state, mesh, fsdp=True, axis=axis),
                     batch_sharding(mesh, axis), replicated(mesh))


# -------------------------------------------------------------------------- steps


def _jit(fn, shardings: Shardings | None, n_batch: int, out_keys: tuple[str, ...],
         out_state: bool, donate: bool, weights: bool = False, options: dict | None = None):
    """``jax.jit`` with the platform's options (``revjax.streams.compiler_options``) and, with
    ``shardings``, those in/out shardings. On a mesh with explicit axes the body runs under
    ``jax.sharding.auto_axes`` (XLA propagates shardings inside, as on an ``Auto`` mesh; the
    patch-embedding convolution has no explicit-sharding rule for FSDP-sharded kernels)
    inside ``jax.set_mesh``. ``options`` replaces the platform's compiler options."""
    kw: dict = dict(compiler_options=compiler_options() if options is None else options)
    if donate:
        kw["donate_argnums"] = (0,)
    if shardings is None:
        return jax.jit(fn, **kw)
    rep = shardings.replicated
    metrics = {k: rep for k in out_keys}
    kw["in_shardings"] = (shardings.state, (shardings.batch,) * n_batch,
                          shardings.batch if weights else rep)
    kw["out_shardings"] = (shardings.state, metrics) if out_state else metrics
    mesh = shardings.batch.mesh
    if not _explicit(mesh):
        return jax.jit(fn, **kw)
    specs = jax.tree.map(lambda s: s.spec, kw["out_shardings"])
    jitted = jax.jit(jax.sharding.auto_axes(fn, out_sharding=specs), **kw)
    return _WithMesh(jitted, mesh)


class _WithMesh:
    """A jitted step called (and lowered) with its explicit mesh set."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def make_train_step(graphdef: nnx.GraphDef, *, task: str = "classification",
                    mode: str | None = None, shardings: Shardings | None = None,
                    donate: bool = False, compiler_options: dict | None = None):
    """``step(state, batch, key) -> (state, {"loss", "grad_norm"})``, jitted, for the state
    of ``nnx.split((model, optimizer))``. ``key`` (or None) seeds dropout; ``batch`` is
    ``(images, labels)`` or ``(inputs, labels, mask)`` (``task``). With ``shardings``
    (``data_parallel`` / ``fsdp``) the state and batch keep those shardings.
    ``compiler_options`` (default: ``revjax.streams.compiler_options()`` for the default
    backend) are XLA's options for the step, e.g. ``compiler_options("cuda")`` when
    compiling ahead of time for a GPU from a CPU machine."""
    _check_task(task)

    def step(state, batch, key):
        model, optimizer = nnx.merge(graphdef, state)
        rngs = None if key is None else nnx.Rngs(dropout=key)
        loss, grads = nnx.value_and_grad(
            lambda m: compute_loss(m, batch, task=task, mode=mode, rngs=rngs))(model)
        grad_norm = optax.global_norm(grads)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": grad_norm}

    return _jit(step, shardings, 2 if task == "classification" else 3,
                ("loss", "grad_norm"), True, donate, options=compiler_options)


def make_eval_step(graphdef: nnx.GraphDef, *, task: str = "classification",
                   mode: str | None = None, shardings: Shardings | None = None):
    """``eval(state, batch, weights) -> sums``, jitted (no dropout, no update). ``weights``
    (batch,) is 1 for real examples, 0 for padding. Classification: ``{"loss_sum",
    "correct", "count"}``; mlm: ``{"loss_sum", "count"}`` over the predicted tokens of
    the rows with weight 1. Sums, so that batches add up exactly."""
    _check_task(task)

    def evaluate(state, batch, weights):
        model, _ = nnx.merge(graphdef, state)
        if task == "classification":
            images, labels = batch
            logits = model(images, mode=mode)
            logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
            w = weights.astype(logits.dtype)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            correct = (logits.argmax(-1) == labels).astype(w.dtype)
            return {"loss_sum": (losses * w).sum(), "correct": (correct * w).sum(),
                    "count": w.sum()}
        inputs, labels, mask = batch
        logits = model(inputs, mask, mode=mode)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        valid = (labels >= 0) & (weights[:, None] > 0)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.where(valid, labels, 0))
        return {"loss_sum": jnp.where(valid, losses, 0).sum(),
                "count": valid.sum().astype(logits.dtype)}

    keys = ("loss_sum", "correct", "count") if task == "classification" else ("loss_sum",
                                                                              "count")
    return _jit(evaluate, shardings, 2 if task == "classification" else 3, keys, False,
                False, weights=True)


@functools.lru_cache(maxsize=32)
def _cached_train_step(graphdef, task, mode):
    return make_train_step(graphdef, task=task, mode=mode)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array, *, mode: str | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """One optimizer step on a classification batch, updating ``model`` and ``optimizer``
    in place; returns the loss. ``mode`` picks the backward; ``rngs`` (a ``dropout``
    stream) turns on dropout. The compiled program is cached per model structure."""
    graphdef, state = nnx.split((model, optimizer))
    key = None if rngs is None else rngs.dropout()
    state, metrics = _cached_train_step(graphdef, "classification", mode)(
        state, (images, labels), key)
    nnx.update((model, optimizer), state)
    return metrics["loss"]


def put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` of a pytree onto matching shardings (a tree or one sharding)."""
    return jax.device_put(tree, shardings)


__all__ = ["TASKS", "Shardings", "batch_sharding", "check_mesh", "compute_loss",
           "create_optimizer", "cross_entropy_loss", "data_parallel", "fsdp",
           "learning_rate", "make_eval_step", "make_mesh", "make_optimizer",
           "make_train_step", "put", "replicated", "state_shardings", "train_step"]
