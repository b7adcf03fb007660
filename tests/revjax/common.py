"""Helpers the revjax model tests share: abstract models with host-drawn parameters, image
batches, the classification loss and its compiled gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import revjax
from revjax.train import cross_entropy_loss


def abstract_model(name, dtype=jnp.float32, **overrides):
    """The model's structure only (``nnx.eval_shape``: nothing allocated or initialised)."""
    return nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0),
                                                      param_dtype=dtype, **overrides))


def random_params(state, seed=0, scale=0.05):
    """Parameters drawn on the host for an abstract ``state``: LayerNorm scales
    1 + 0.1 N(0, 1), every other leaf (biases and position tables too) ``scale`` N(0, 1).
    Building a model eagerly compiles every initialiser op for every shape (~10 s for two
    stages on a 2-core CPU); gradients and memory do not depend on the initialisation."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        is_scale = "['scale']" in jax.tree_util.keystr(path)
        noise = rng.normal(size=leaf.shape)
        return jnp.asarray(1 + 0.1 * noise if is_scale else scale * noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, state)


def model_and_params(model, seed=0):
    """(model, graphdef, parameters) for an abstract ``model``, parameters from
    ``random_params``."""
    graphdef, state = nnx.split(model)
    params = random_params(state, seed)
    return nnx.merge(graphdef, params), graphdef, params


def batch(config, n=2, dtype=jnp.float32, seed=0):
    """NHWC images for ``config`` and integer labels."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (n, config.img_size, config.img_size, 3), dtype)
    return x, jax.random.randint(k2, (n,), 0, config.num_classes)


def loss(graphdef, params, x, y, mode, key):
    """Cross-entropy of the model in ``mode``; dropout on when ``key`` is not None."""
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return cross_entropy_loss(nnx.merge(graphdef, params)(x, mode=mode, rngs=rngs), y)


@functools.cache
def grad_fn(graphdef):
    """Gradients (parameters, images) of ``loss``, the mode static."""
    return jax.jit(jax.grad(functools.partial(loss, graphdef), argnums=(0, 1)),
                   static_argnums=3)
