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

import itertools
import json
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


def _region_primitive():
    """The library's own stream region: a primitive that lowers to one ``func.call`` of the
    region's computation, carrying the frontend attributes it is bound with, whose results
    go straight to their users (``compute_on`` passes every output through a placement
    custom call, which XLA:GPU 0.11 turns into one small async pair per output, consumed at
    once). Built on first use: it reaches into jax's lowering internals, and only the GPU
    path needs it. Not differentiable (pareprop's backward runs it, nothing differentiates
    that)."""
    global _REGION_P
    if _REGION_P is None:
        from jax._src.interpreters import mlir
        from jax._src.lib.mlir import ir

        p = jex_core.Primitive("revjax_stream_region")
        p.multiple_results = True
        p.def_impl(lambda *args, jaxpr, attributes: jex_core.jaxpr_as_fun(jaxpr)(*args))
        p.def_abstract_eval(lambda *avals, jaxpr, attributes: jaxpr.out_avals)

        def lowering(ctx, *args, jaxpr, attributes):
            # jax 0.10 lowers a closed jaxpr, 0.11 an open one (the region has no consts)
            body = jaxpr if jax.__version_info__ < (0, 11) else jaxpr.jaxpr
            outs, _ = mlir.call_lowering(
                "stream_region", body, None, ctx.module_context, ctx.avals_in,
                ctx.avals_out, ctx.tokens_in.subset([]), *args,
                dim_var_values=ctx.dim_var_values, const_lowering=ctx.const_lowering,
                attributes={k: ir.StringAttr.get(v) for k, v in attributes})
            return outs

        mlir.register_lowering(p, lowering)
        _REGION_P = p
    return _REGION_P


_REGION_P = None


def _region_attributes(stream: int, group: int) -> dict:
    """Frontend attributes of a region's call under ``GPU_REGION`` (see there)."""
    attrs = {"inlineable": "false"}
    if "queue" in GPU_REGION:
        attrs["backend_config"] = json.dumps({"operation_queue_id": str(stream)})
    else:
        attrs["_xla_stream_annotation"] = str(stream)
    if "group" in GPU_REGION:
        attrs["_scheduling_group_id"] = str(group)
    if "force_delay" in GPU_REGION:
        attrs["scheduler_hint"] = "force_delay"
    return attrs


def _on_stream(fn, stream: int, group: int = 0):
    """``fn`` flattened (``flatten_calls``) and annotated to run on CUDA stream ``stream``:
    with jax's ``compute_on`` (jax 0.10: ``compute_on2``, jax 0.11+: ``compute_on`` as a
    function wrapper), or with ``"call"`` in ``GPU_REGION`` as the library's own region
    (``_region_primitive``), ``group`` naming the pair it belongs to.

    A half that still holds a loop or conditional after flattening is not annotated (XLA
    cannot give the nested computation a stream): it runs on the main stream, with a warning
    naming the primitive. Values and gradients are the same either way.
    """
    from jax.experimental import compute_on as co

    wrap = getattr(co, "compute_on2", None) or co.compute_on

    def run(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        nested = unflattenable(closed.jaxpr)
        tree = jax.tree.structure(shapes)
        flat_fn = lambda *a: jax.tree.unflatten(tree, _eval_flat(
            closed.jaxpr, closed.consts, jax.tree.leaves(a)))
        if nested:
            warnings.warn(
                f"pareprop: a piece of the backward step contains {sorted(set(nested))}, which "
                "XLA:GPU cannot place on a CUDA stream; it runs on the main stream "
                "(same values and gradients, no stream overlap). F and G without loops or "
                "conditionals get the streams.", RuntimeWarning, stacklevel=2)
            return flat_fn(*args)
        if "call" not in GPU_REGION:
            extra = ({"compiler_options": {"operation_queue_id": str(stream)}}
                     if "queue" in GPU_REGION else {})
            return wrap(flat_fn, compute_type=f"gpu_stream:{stream}",
                        out_memory_spaces=jax.memory.Space.Device, **extra)(*args)
        # Every input explicit (closed-over tracers of the step included), so the region's
        # computation closes over nothing.
        from jax._src.interpreters.partial_eval import convert_constvars_jaxpr

        consts, leaves = list(closed.consts), jax.tree.leaves(args)
        region = jax.make_jaxpr(lambda c, a: _eval_flat(closed.jaxpr, c, a))(consts, leaves)
        inputs = [*region.consts, *consts, *leaves]
        region = jex_core.ClosedJaxpr(convert_constvars_jaxpr(region.jaxpr), ())
        attrs = tuple(sorted(_region_attributes(stream, group).items()))
        outs = _region_primitive().bind(*inputs, jaxpr=region, attributes=attrs)
        return jax.tree.unflatten(tree, outs)

    return run


# How ``side_by_side`` emits its two regions on GPU (with ``GPU_STREAMS``): a set of
#   "call"         the library's own region (``_region_primitive``) instead of ``compute_on``:
#                  no placement wrapper per output; the outputs of both regions are used only
#                  after both (one optimization barrier over them);
#   "group"        both regions of a pair carry one ``_scheduling_group_id`` (own region);
#   "force_delay"  and ``scheduler_hint="force_delay"`` (own region);
#   "queue"        the stream as ``operation_queue_id`` in the call's backend config: instead of
#                  the stream annotation (own region), or beside it (``compute_on``'s
#                  ``compiler_options``).
# docs/pareprop-gpu.md has what each does to the scheduled loop body.
GPU_REGION: frozenset = frozenset()
_GROUPS = itertools.count()


GRADS_STREAM, REBUILD_STREAM = 1, 2

# Whether pareprop puts its two pieces of work on CUDA streams ``GRADS_STREAM`` /
# ``REBUILD_STREAM`` on GPU (read when the step is traced; set
# ``revjax.streams.GPU_STREAMS = True`` before ``jax.jit``). Off by default: compiled for an
# H200 on jax 0.10.2 and 0.11.2, XLA schedules
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
        group = next(_GROUPS)
        out = (_on_stream(grads_fn, GRADS_STREAM, group)(*grads_args),
               _on_stream(rebuild_fn, REBUILD_STREAM, group)(*rebuild_args))
        return lax.optimization_barrier(out) if "call" in GPU_REGION else out

    return lax.platform_dependent(cuda=on_gpu, default=elsewhere)
