"""PaReprop's two halves on CUDA streams, and the compiler options for pareprop programs.

A pareprop step holds two independent pieces of work: the gradient of one half-layer and the
rebuild of the next (``core``). On XLA:CPU independent ops run on separate threads by
themselves. XLA:GPU runs one stream unless told otherwise: with ``GPU_STREAMS`` on,
``side_by_side`` annotates each piece onto a CUDA stream of its own (``compute_on``), after
flattening every nested call into the region (``flatten_calls``: XLA cannot give a call
inside a stream region a stream of its own). ``compiler_options`` gives the XLA options the
library compiles pareprop programs with, per platform.
"""

from __future__ import annotations

import warnings

import jax
from jax import lax
from jax.extend import core as jex_core

# Call-like primitives whose body is spliced into a stream region (param holding the body).
# Inside a region XLA keeps every nested call as an un-inlineable call on the stream and then
# cannot give it a stream of its own ("No ExecutionStreamId found"), so a region must be flat.
_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
            "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
            "remat2": "jaxpr"}
# Primitives whose jaxpr parameter is only a combiner (lowered as an HLO ``to_apply``
# computation, like a reduction's), not a nested call: they may stay in a stream region.
_COMBINERS = ("scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max")


def _body(eqn):
    """The spliceable body of a call-like equation as ``(jaxpr, consts)``, or None."""
    key = _INLINED.get(eqn.primitive.name)
    body = eqn.params.get(key) if key else None
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return (body, ()) if isinstance(body, jex_core.Jaxpr) else None


def unflattenable(jaxpr) -> list[str]:
    """Primitives of ``jaxpr`` (call bodies included) that carry sub-computations which
    ``flatten_calls`` cannot splice: loops, conditionals and the like."""
    found = []
    for eqn in jaxpr.eqns:
        body = _body(eqn)
        if body is not None:
            found += unflattenable(body[0])
        elif (eqn.primitive.name not in _COMBINERS
              and next(iter(jex_core.jaxprs_in_params(eqn.params)), None) is not None):
            found.append(eqn.primitive.name)
    return found


def _eval_flat(jaxpr, consts, args):
    """Evaluate ``jaxpr`` by re-binding its equations, splicing in the bodies of call-like
    equations (``_INLINED``) recursively."""
    env = {}
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        body = _body(eqn)
        if body is not None:
            outs = _eval_flat(*body, ins)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            if isinstance(params, tuple):  # older jax: (subfuns, params)
                subfuns, params = params
                ins = [*subfuns, *ins]
            outs = eqn.primitive.bind(*ins, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update((v, o) for v, o in zip(eqn.outvars, outs)
                   if not isinstance(v, jex_core.DropVar))
    return [read(v) for v in jaxpr.outvars]


def flatten_calls(fn, *args):
    """Trace ``fn(*args)`` and return ``(flat_fn, unflattened)``: ``flat_fn`` computes the
    same values with every nested jitted or call-like function spliced into one body, and
    ``unflattened`` lists the primitives with sub-computations that stay nested
    (``unflattenable``)."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    tree = jax.tree.structure(shapes)

    def flat_fn(*args):
        return jax.tree.unflatten(tree, _eval_flat(closed.jaxpr, closed.consts,
                                                   jax.tree.leaves(args)))

    return flat_fn, unflattenable(closed.jaxpr)


def _on_stream(fn, stream: int):
    """``fn`` flattened (``flatten_calls``) and annotated to run on CUDA stream ``stream``
    (jax 0.10: ``compute_on2``, jax 0.11+: ``compute_on`` as a function wrapper).

    A half that still holds a loop or conditional after flattening is not annotated (XLA
    cannot give the nested computation a stream): it runs on the main stream, with a warning
    naming the primitive. Values and gradients are the same either way.
    """
    from jax.experimental import compute_on as co

    wrap = getattr(co, "compute_on2", None) or co.compute_on

    def run(*args):
        flat_fn, nested = flatten_calls(fn, *args)
        if nested:
            warnings.warn(
                f"pareprop: a piece of the backward step contains {sorted(set(nested))}, which "
                "XLA:GPU cannot place on a CUDA stream; it runs on the main stream "
                "(same values and gradients, no stream overlap). F and G without loops or "
                "conditionals get the streams.", RuntimeWarning, stacklevel=2)
            return flat_fn(*args)
        return wrap(flat_fn, compute_type=f"gpu_stream:{stream}",
                    out_memory_spaces=jax.memory.Space.Device)(*args)

    return run


GRADS_STREAM, REBUILD_STREAM = 1, 2

# Whether pareprop puts its two pieces of work on CUDA streams ``GRADS_STREAM`` /
# ``REBUILD_STREAM`` on GPU (read when the step is traced; set
# ``revjax.streams.GPU_STREAMS = True`` before ``jax.jit``). Off by default: compiled for an H200 on jax 0.10.2 and 0.11.2, XLA schedules
# the two stream regions one after the other in the loop body (no overlap; no flag or step
# shape tried changed that) while keeping both regions' buffers live, which raises the
# step's memory (docs/pareprop-gpu.md has the measurements). Off, the GPU program is the
# same dataflow on one stream.
GPU_STREAMS = False

# XLA:CPU compiler options for programs that use pareprop (``jax.jit(fn, compiler_options=
# CPU_COMPILER_OPTIONS)``, or the same as ``XLA_FLAGS``). pareprop carries a half-layer's VJP
# residuals and parameter slices from the step that rebuilds it to the step that
# differentiates it; XLA's default copy insertion copies every carried value at every step
# (the new ones are written while the old are still read), region analysis proves the
# copies unneeded and drops them. The pareprop-cpu probe of the benchmark suite measures it.
CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
# XLA:GPU options for programs that use pareprop: none is needed (none found that makes the
# stream regions overlap, see ``GPU_STREAMS``); kept so user code can pass the per-platform
# choice of ``compiler_options`` unchanged when one is.
GPU_COMPILER_OPTIONS: dict = {}


def compiler_options(platform: str | None = None) -> dict:
    """The compiler options the library uses for pareprop programs on ``platform`` (default:
    ``jax.default_backend()``): ``CPU_COMPILER_OPTIONS`` on CPU, ``GPU_COMPILER_OPTIONS`` on
    CUDA, none elsewhere. Pass them as ``jax.jit(fn, compiler_options=...)``."""
    platform = platform or jax.default_backend()
    return dict({"cpu": CPU_COMPILER_OPTIONS, "cuda": GPU_COMPILER_OPTIONS,
                 "gpu": GPU_COMPILER_OPTIONS}.get(platform, {}))


def side_by_side(grads_fn, grads_args, rebuild_fn, rebuild_args):
    """``(grads_fn(*grads_args), rebuild_fn(*rebuild_args))``: two pieces of work that share
    no data. With ``GPU_STREAMS`` the CUDA program puts them on streams ``GRADS_STREAM`` and
    ``REBUILD_STREAM`` (other platforms run the same dataflow); without, every platform gets
    the same program."""
    def elsewhere():
        return grads_fn(*grads_args), rebuild_fn(*rebuild_args)

    if not GPU_STREAMS:
        return elsewhere()

    def on_gpu():
        return (_on_stream(grads_fn, GRADS_STREAM)(*grads_args),
                _on_stream(rebuild_fn, REBUILD_STREAM)(*rebuild_args))

    return lax.platform_dependent(cuda=on_gpu, default=elsewhere)
