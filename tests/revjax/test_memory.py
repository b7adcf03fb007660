"""Compiled training memory per sample of every family's test config, by backward method:
PaReprop holds about what Reprop holds, and Reprop less than per-block rematerialisation of
the standard twin. Exact (XLA:CPU's memory analysis of the compiled gradient function; no
run, no timing). The same measure at real sizes is the benchmark suite's
(``python -m experiments.bench memory``)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import revjax
from revjax import train

# family: (reversible model, standard twin, overrides, task); small enough to compile fast,
# deep enough that every stack's backward loop runs more than one step
CASES = {
    "vit": ("rev-vit-test", "vit-test", dict(depth=4), "classification"),
    "swin": ("rev-swin-test", "swin-test", {}, "classification"),
    "mvit": ("rev-mvit-test", "mvit-test", dict(depths=(2, 2, 2)), "classification"),
    "roberta": ("rev-roberta-test", "roberta-test", dict(depth=4), "mlm"),
}
BATCHES = (2, 4)
TOKENS = 16


@functools.cache
def per_sample(family: str, method: str) -> float:
    """Bytes per sample (slope between ``BATCHES``) of the gradient function's temporaries
    and outputs; ``method``: ``reprop``, ``pareprop`` or ``remat`` (the standard twin with
    per-block ``nothing_saveable`` rematerialisation)."""
    rev, std, overrides, task = CASES[family]
    name, mode = (std, "backprop") if method == "remat" else (rev, method)
    model = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0), mode=mode,
                                                       **overrides))
    if method == "remat":
        revjax.set_remat(model, "nothing_saveable")
    graphdef, params = nnx.split(model)
    cfg = model.config

    def compiled_bytes(b):
        if task == "mlm":
            batch = (jax.ShapeDtypeStruct((b, TOKENS), jnp.int32),) * 2 + (
                jax.ShapeDtypeStruct((b, TOKENS), jnp.bool_),)
        else:
            batch = (jax.ShapeDtypeStruct((b, cfg.img_size, cfg.img_size, 3), jnp.float32),
                     jax.ShapeDtypeStruct((b,), jnp.int32))

        def grads(params, batch):
            return jax.grad(lambda p: train.compute_loss(nnx.merge(graphdef, p), batch,
                                                         task=task, mode=mode))(params)

        m = jax.jit(grads, compiler_options=revjax.CPU_COMPILER_OPTIONS).lower(
            params, batch).compile().memory_analysis()
        return m.temp_size_in_bytes + m.output_size_in_bytes

    small, large = (compiled_bytes(b) for b in BATCHES)
    return (large - small) / (BATCHES[1] - BATCHES[0])


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(
        strict=True, reason="RoBERTa's test config (dim 32, 16 tokens) without the full MLM "
        "logits: pareprop 1.35x reprop (two halves' residuals at the peak); at RoBERTa-base "
        "512 tokens (H200 compile) it is 1.00x")) if f == "roberta" else f
    for f in CASES])
def test_pareprop_holds_about_what_reprop_holds(family):
    pareprop, reprop = per_sample(family, "pareprop"), per_sample(family, "reprop")
    assert pareprop <= 1.15 * reprop, (family, pareprop / reprop)


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.xfail(
        strict=True, reason="MViT's test config (32 px, dim 16): reprop 1.08x remat; at "
        "MViT-B 224 px (H200 compile) reprop is 0.51x remat")) if f == "mvit" else f
    for f in CASES])
def test_reprop_is_below_per_block_remat(family):
    reprop, remat = per_sample(family, "reprop"), per_sample(family, "remat")
    assert reprop < remat, (family, reprop / remat)
