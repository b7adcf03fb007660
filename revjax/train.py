"""A classification training step for any ``revjax.models`` model (Flax NNX + optax)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()


@partial(nnx.jit, static_argnames="mode")
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array, *, mode: str | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """One optimizer step on a batch; returns the loss. ``mode`` picks the backward."""

    def loss_fn(model):
        return cross_entropy_loss(model(images, mode=mode, rngs=rngs), labels)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
