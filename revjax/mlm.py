"""Masked-language modelling (Devlin et al., 2019; RoBERTa's dynamic masking, Liu et al., 2019):
token masking, the loss over the masked positions, and a training step for any MLM model of
``revjax.models`` (called ``model(ids, mask, *, mode, rngs)`` -> logits).

Labels use ``IGNORE`` (-100) at the positions that are not predicted, as in the twin
``revtorch.mlm``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

IGNORE = -100


def mask_tokens(ids: jax.Array, key: jax.Array, *, mask_id: int, vocab_size: int,
                pad_id: int | None = None, special_mask: jax.Array | None = None,
                prob: float = 0.15) -> tuple[jax.Array, jax.Array]:
    """BERT's masking: select each eligible token with probability ``prob``; of those, 80%
    become ``mask_id``, 10% a token drawn uniformly from ``[0, vocab_size)``, 10% stay.

    Args:
      ids: integer token ids, any shape (usually (batch, length)).
      key: a ``jax.random`` key; the result is a pure function of it.
      mask_id, vocab_size: the mask token and the vocabulary size (for random tokens).
      pad_id: the padding id; padding is never selected.
      special_mask: optional boolean array of ``ids``' shape, True where a token must never
        be selected (``<s>``, ``</s>``, padding...). At least one of ``pad_id`` and
        ``special_mask`` is required, so that padding cannot be selected by accident.
      prob: selection probability.

    Returns:
      ``(inputs, labels)``: ``inputs`` the corrupted ids; ``labels`` the original id at the
      selected positions and ``IGNORE`` elsewhere (both of ``ids``' dtype). Random
      replacements never draw ``pad_id`` (when given), so the padding mask a model derives
      from ``inputs`` (``inputs != pad_id``) is the one of ``ids``.
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"expected integer token ids, got {ids.dtype}")
    if pad_id is None and special_mask is None:
        raise ValueError("pass pad_id and/or special_mask, so that padding is never selected")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if pad_id is not None and mask_id == pad_id:
        raise ValueError(f"mask_id and pad_id must differ, both are {mask_id}")
    eligible = jnp.ones(ids.shape, bool)
    if pad_id is not None:
        eligible &= ids != pad_id
    if special_mask is not None:
        special_mask = jnp.asarray(special_mask)
        if special_mask.shape != ids.shape:
            raise ValueError(f"special_mask must have the ids' shape {ids.shape}, "
                             f"got {special_mask.shape}")
        eligible &= ~special_mask.astype(bool)
    k_select, k_how, k_token = jax.random.split(key, 3)
    selected = eligible & jax.random.bernoulli(k_select, prob, ids.shape)
    how = jax.random.uniform(k_how, ids.shape)
    if pad_id is None:
        random_tokens = jax.random.randint(k_token, ids.shape, 0, vocab_size, ids.dtype)
    else:  # uniform over the vocabulary without pad_id
        random_tokens = jax.random.randint(k_token, ids.shape, 0, vocab_size - 1, ids.dtype)
        random_tokens = random_tokens + (random_tokens >= pad_id).astype(ids.dtype)
    inputs = jnp.where(selected & (how < 0.8), jnp.asarray(mask_id, ids.dtype), ids)
    inputs = jnp.where(selected & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
    labels = jnp.where(selected, ids, jnp.asarray(IGNORE, ids.dtype))
    return inputs, labels


def mlm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the positions whose label is not ``IGNORE``, in
    float32 (or wider); 0 when there are none. logits (..., vocab), labels (...)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} do not match labels {labels.shape}")
    return _loss_sum(logits, labels) / jnp.maximum((labels != IGNORE).sum(), 1)


def _loss_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The summed cross-entropy over the positions whose label is not ``IGNORE``."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    valid = labels != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(valid, labels, 0))
    return jnp.where(valid, losses, 0).sum()


HEAD_CHUNK = 32  # positions per row that the head's logits are computed for at a time


def head_loss(head: Callable, params, features: jax.Array, labels: jax.Array, *,
              chunk: int = HEAD_CHUNK) -> jax.Array:
    """``mlm_loss(head(params, features), labels)`` without the (batch, length, vocab) logits.

    The MLM head's logits are the largest activation of a masked-language model (RoBERTa-base
    at 512 tokens: 100 MiB per sample in float32, several times its encoder's), and only the
    predicted positions (labels not ``IGNORE``, about 15%) enter the loss. Each row's
    predicted positions are moved to its front (a stable sort), and the head runs on
    ``chunk`` positions of every row at a time, rematerialised (its logits are recomputed in
    the backward, never stored); a chunk with no predicted position in any row is skipped
    (``lax.cond``). The peak holds one chunk's logits, and the head's cost follows the
    positions predicted. Equal to ``mlm_loss`` on the full logits up to the order of the sum.

    Args:
      head: ``head(params, x) -> logits`` for x (batch, n, C), a pure function.
      params: its parameters (any pytree), differentiated as usual.
      features: (batch, length, C); labels: (batch, length), ``IGNORE`` where not predicted.
      chunk: positions per row per step (>= 1).
    """
    if features.ndim != 3 or labels.shape != features.shape[:2]:
        raise ValueError(f"features (batch, length, C) {features.shape} do not match labels "
                         f"{labels.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, length, dim = features.shape
    valid = labels != IGNORE
    order = jnp.argsort(~valid, axis=1, stable=True)  # predicted positions first
    x = jnp.take_along_axis(features, order[..., None], axis=1)
    y = jnp.take_along_axis(labels, order, axis=1)
    n = -(-length // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - length), (0, 0)))
    y = jnp.pad(y, ((0, 0), (0, n * chunk - length)), constant_values=IGNORE)
    x = x.reshape(batch, n, chunk, dim).swapaxes(0, 1)
    y = y.reshape(batch, n, chunk).swapaxes(0, 1)
    dtype = jnp.promote_types(features.dtype, jnp.float32)

    @jax.checkpoint
    def chunk_sum(params, x, y):
        return _loss_sum(head(params, x), y).astype(dtype)

    def step(total, xy):
        x, y = xy
        part = jax.lax.cond((y != IGNORE).any(), chunk_sum,
                            lambda *_: jnp.zeros((), dtype), params, x, y)
        return total + part, None

    total, _ = jax.lax.scan(step, jnp.zeros((), dtype), (x, y))
    return total / jnp.maximum(valid.sum(), 1)


@partial(nnx.jit, static_argnames="mode")
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array,
               labels: jax.Array, mask: jax.Array | None = None, *, mode: str | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """One optimizer step on a masked batch (``inputs, labels = mask_tokens(...)``); returns
    the loss. ``mask`` is the padding mask (None: derived from the model's ``pad_id``)."""

    def loss_fn(model):
        return model.loss(ids, labels, mask, mode=mode, rngs=rngs)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
