"""Rev-RoBERTa and its standard RoBERTa twin (Liu et al., "RoBERTa: A Robustly Optimized BERT
Pretraining Approach", 2019), masked-language models over token ids.

Token embedding + learned position embedding with RoBERTa's padding-offset positions (token t
of a row sits at position ``1 + number of real tokens up to t``; padding sits at position 1,
so the table has ``max_len + 2`` rows, row 0 unused), then the embedding LayerNorm. The
reversible encoder starts both streams from the embedding, F = LayerNorm + self-attention
over the real tokens (the padding mask is a ``shared`` input of the stack), G = LayerNorm +
MLP; the two streams are averaged to width C, normalised, and the MLM head (dense, exact
GELU, LayerNorm, decoder tied to the token embedding plus its own bias) gives the logits.
The standard twin runs the same F and G as pre-norm residual blocks on one stream.

Padding: attention never reads a padded key (its probability is exactly 0), and every other
op is per token, so padded positions change no output and no gradient at a real position,
in every mode. Their own outputs are meaningless; ``revjax.mlm`` ignores them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import layers, mlm
from ..stack import ResidualStack, RevStack
from .registry import register_family
from .config import resolve_mode, stack_options

# RoBERTa's padding_idx for positions: padding sits at row 1, real tokens at rows 2.. (the
# layout of the released checkpoints, whose pad token id is 1 as well). Fixed, so that the
# table size does not depend on ``pad_id``.
POS_PAD = 1


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    name: str
    reversible: bool
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    vocab_size: int = 50265
    max_len: int = 512
    pad_id: int = 1
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (None: the parameters')
    param_dtype: Any = jnp.float32
    stream_dtype: Any = None  # residual streams' dtype (None: the compute dtype); reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible


# (dim, depth, heads): RoBERTa-base/large (Liu et al., 2019; the BERT-base/large shapes of
# Devlin et al., 2019, Table 1), byte-level BPE vocabulary of 50265 tokens, 512 positions.
VARIANTS = {
    "base": dict(dim=768, depth=12, heads=12),
    "large": dict(dim=1024, depth=24, heads=16),
    "test": dict(dim=32, depth=2, heads=2, vocab_size=100, max_len=16),
}


def position_ids(mask: jax.Array) -> jax.Array:
    """RoBERTa's positions from a (batch, length) padding mask (nonzero = real token):
    ``cumsum(mask) * mask + 1``; real tokens count from 2, padding sits at 1."""
    m = mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m + POS_PAD


class MlmHead(nnx.Module):
    """dense(C, C) -> exact GELU -> LayerNorm -> decoder tied to the token embedding + bias."""

    def __init__(self, dim: int, vocab_size: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.dense = layers.dense(dim, dim, rngs, dtype, param_dtype)
        self.norm = layers.layer_norm(dim, rngs, dtype, param_dtype)
        self.bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype))

    def __call__(self, x: jax.Array, embed: nnx.Embed) -> jax.Array:
        h = self.norm(jax.nn.gelu(self.dense(x), approximate=False))
        logits = embed.attend(h)
        return logits + self.bias[...].astype(logits.dtype)


class Roberta(nnx.Module):
    """A RoBERTa MLM whose encoder is a ``RevStack`` (``config.reversible``) or residual blocks."""

    def __init__(self, config: RobertaConfig, *, rngs: nnx.Rngs, mode: str | None = None):
        c = config
        if c.max_len < 1 or c.vocab_size < 1:
            raise ValueError(f"max_len and vocab_size must be positive, got {c.max_len}, "
                             f"{c.vocab_size}")
        if not 0 <= c.pad_id < c.vocab_size:
            raise ValueError(f"pad_id {c.pad_id} is outside the vocabulary [0, {c.vocab_size})")
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.tok_embed = nnx.Embed(c.vocab_size, c.dim, embedding_init=layers.init_w,
                                   rngs=rngs, **kw)
        self.pos_embed = nnx.Embed(c.max_len + POS_PAD + 1, c.dim,
                                   embedding_init=layers.init_w, rngs=rngs, **kw)
        self.embed_norm = layers.layer_norm(c.dim, rngs, **kw)
        reg = dict(drop_rate=c.drop_rate, drop_path_rate=c.drop_path_rate, **kw)
        make_f = lambda r: layers.AttentionHalf(c.dim, c.heads, rngs=r, **reg)
        make_g = lambda r: layers.MlpHalf(c.dim, int(c.dim * c.mlp_ratio), rngs=r, **reg)
        if c.reversible:
            self.blocks = RevStack(make_f, make_g, depth=c.depth, rngs=rngs, mode=self.mode,
                                   **numerics)
        else:
            self.blocks = ResidualStack(make_f, make_g, depth=c.depth, rngs=rngs)
        self.norm = layers.layer_norm(c.dim, rngs, **kw)
        self.head = MlmHead(c.dim, c.vocab_size, rngs=rngs, **kw)

    def _inputs(self, ids, mask):
        """Checked ids and a boolean padding mask (derived from ``pad_id`` when None)."""
        c = self.config
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"expected integer token ids, got {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {ids.shape}")
        if ids.shape[1] > c.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {c.max_len}")
        if mask is None:
            return ids, ids != c.pad_id
        mask = jnp.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"mask must have the ids' shape {ids.shape}, got {mask.shape}")
        return ids, mask > 0 if mask.dtype != jnp.bool_ else mask

    def features(self, ids: jax.Array, mask: jax.Array | None = None, *,
                 mode: str | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Normalised encoder output (batch, length, C); for Rev-RoBERTa the average of the
        two streams."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        ids, mask = self._inputs(ids, mask)
        h = self.embed_norm(self.tok_embed(ids) + self.pos_embed(position_ids(mask)))
        keys = layers.layer_keys(rngs, c.depth) if (c.drop_rate or c.drop_path_rate) else {}
        if c.reversible:
            y1, y2 = self.blocks(h, h, mask, per_layer=keys, mode=mode)
            h = (y1 + y2) / 2
        else:
            h = self.blocks(h, mask, per_layer=keys)
        return self.norm(h)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
                 mode: str | None = None, rngs: nnx.Rngs | None = None,
                 labels: jax.Array | None = None) -> jax.Array:
        """MLM logits (batch, length, vocab_size) for token ids (batch, length).

        ``mask`` (batch, length), nonzero for real tokens, defaults to ``ids != pad_id``; it
        is not differentiated. Ids outside ``[0, vocab_size)`` are not checked (jax's
        gather fills them with NaN). ``mode`` overrides the backward mode for this call;
        ``rngs`` (with a ``dropout`` stream) turns on dropout/drop-path in F and G.
        """
        if labels is not None:  # the MLM loss instead (``loss``), as the torch twin
            return self.loss(ids, labels, mask, mode=mode, rngs=rngs)
        return self.head(self.features(ids, mask, mode=mode, rngs=rngs), self.tok_embed)

    def loss(self, ids: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
             mode: str | None = None, rngs: nnx.Rngs | None = None,
             chunk: int = mlm.HEAD_CHUNK) -> jax.Array:
        """The MLM loss, ``mlm_loss(self(ids, mask), labels)``, without the full logits: the
        head runs on the predicted positions only, ``chunk`` per row at a time, and its
        logits are recomputed in the backward (``revjax.mlm.head_loss``). The training
        steps use it; ``__call__`` still gives every position's logits."""
        if labels.shape != jnp.shape(ids):
            raise ValueError(f"labels {labels.shape} do not match ids {jnp.shape(ids)}")
        h = self.features(ids, mask, mode=mode, rngs=rngs)
        graphdef, state = nnx.split((self.head, self.tok_embed))

        def head(state, x):
            head, embed = nnx.merge(graphdef, state)
            return head(x, embed)

        return mlm.head_loss(head, state, h, labels, chunk=chunk)


register_family("roberta", RobertaConfig, Roberta, VARIANTS)
