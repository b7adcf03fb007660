"""One cell in JAX: the training loss's compiled gradient function (memory: XLA's analysis,
exact with no run; on an H200 target with ``--backend gpu-compile``), and the library's
training step (speed, and the device's peak on a GPU)."""

from __future__ import annotations

from typing import Callable

from experiments.bench.cells import REMAT, Cell, variant_config


def _batch(cell: Cell, config, *, abstract: bool):
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


def _model(cell: Cell, *, abstract: bool, optimizer: bool):
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


def step(cell: Cell):
    """(jitted train step, state, batch) for ``cell``: the library's own step (AdamW)."""
    from flax import nnx

    from revjax import train

    model, optimizer = _model(cell, abstract=False, optimizer=True)
    graphdef, state = nnx.split((model, optimizer))
    fn = train.make_train_step(graphdef, task="mlm" if cell.text else "classification",
                               mode=cell.mode(), donate=True)
    return fn, state, _batch(cell, model.config, abstract=False)


def grad_fn(cell: Cell, compiler_options: dict | None = None):
    """(jitted gradient of the training loss, abstract params, abstract batch)."""
    import jax
    from flax import nnx

    from revjax import streams, train

    model, _ = _model(cell, abstract=True, optimizer=False)
    graphdef, params = nnx.split(model)
    task = "mlm" if cell.text else "classification"

    def grads(params, batch):
        loss = lambda p: train.compute_loss(nnx.merge(graphdef, p), batch, task=task,
                                            mode=cell.mode())
        return jax.grad(loss)(params)

    options = streams.compiler_options() if compiler_options is None else compiler_options
    return (jax.jit(grads, compiler_options=options), params,
            _batch(cell, model.config, abstract=True))


def _param_bytes(params) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def memory(cell: Cell) -> dict:
    """The gradient function's compiled memory (parameters and batch in, gradients out,
    temporaries: the activations) plus AdamW's two moments: a training step's footprint
    without the update phase, whose temporaries hide the activations at small batch."""
    import jax

    from revjax import streams

    if cell.backend == "gpu-compile":  # in a process that sees the CUDA plugin (cli.main)
        from revjax import gpu

        from experiments.probes.gpu_compile import DEVICELESS_OPTIONS

        options = {**streams.compiler_options("cuda"), **DEVICELESS_OPTIONS}
        fn, params, batch = grad_fn(cell, options)
        args = gpu.abstract((params, batch), gpu.topology("h200"))
        saved, streams.GPU_STREAMS = streams.GPU_STREAMS, cell.method.endswith("+streams")
        try:
            compiled = fn.trace(*args).lower().compile()
        finally:
            streams.GPU_STREAMS = saved
    else:
        fn, params, batch = grad_fn(cell)
        compiled = fn.lower(params, batch).compile()
    m = compiled.memory_analysis()
    out = {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
           "output_bytes": m.output_size_in_bytes, "moments_bytes": 2 * _param_bytes(params)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                          + out["moments_bytes"])
    if cell.backend == "gpu":
        fn, state, batch = step(cell)
        for _ in range(2):
            state, metrics = fn(state, batch, None)
        jax.block_until_ready(metrics)
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


def runner(cell: Cell) -> Callable[[], None]:
    """One training step of ``cell`` per call, blocking until it is done."""
    import jax

    fn, state, batch = step(cell)
    holder = [state]

    def run():
        holder[0], metrics = fn(holder[0], batch, None)
        jax.block_until_ready(metrics)

    return run
