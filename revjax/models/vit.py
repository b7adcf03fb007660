"""Rev-ViT (Mangalam et al., 2022) and its standard ViT twin (Dosovitskiy et al., 2021).

Patch embedding + learned position embedding (no class token); the reversible encoder starts
both streams from the embedding, F = LayerNorm + attention, G = LayerNorm + MLP; the head
mean-pools the concatenated streams (width 2C), applies LayerNorm and the classifier. The
standard twin runs the same F and G as pre-norm residual blocks on one stream (width C).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .. import layers
from ..stack import ResidualStack, RevStack
from .registry import register_family
from .config import resolve_mode, stack_options


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    name: str
    reversible: bool
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (None: the parameters')
    param_dtype: Any = jnp.float32
    stream_dtype: Any = None  # residual streams' dtype (None: the compute dtype); reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible


# (dim, depth, heads, patch): ViT-Ti/S from DeiT (Touvron et al., 2021), B/L/H from
# Dosovitskiy et al., 2021 (Table 1); H uses 14-pixel patches as in the paper.
VARIANTS = {
    "ti": dict(dim=192, depth=12, heads=3),
    "s": dict(dim=384, depth=12, heads=6),
    "b": dict(dim=768, depth=12, heads=12),
    "l": dict(dim=1024, depth=24, heads=16),
    "h": dict(dim=1280, depth=32, heads=16, patch_size=14),
    "test": dict(dim=32, depth=2, heads=2, img_size=32, patch_size=8, num_classes=10),
}


class VisionTransformer(nnx.Module):
    """A ViT whose encoder is a ``RevStack`` (``config.reversible``) or residual blocks."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, mode: str | None = None):
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.patch_embed = layers.PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim,
                                             rngs=rngs, **kw)
        self.pos_embed = nnx.Param(
            layers.init_w(rngs.params(), (1, self.patch_embed.num_patches, c.dim),
                          c.param_dtype))
        reg = dict(drop_rate=c.drop_rate, drop_path_rate=c.drop_path_rate, **kw)
        make_f = lambda r: layers.AttentionHalf(c.dim, c.heads, rngs=r, **reg)
        make_g = lambda r: layers.MlpHalf(c.dim, int(c.dim * c.mlp_ratio), rngs=r, **reg)
        if c.reversible:
            self.blocks = RevStack(make_f, make_g, depth=c.depth, rngs=rngs, mode=self.mode,
                                   **numerics)
        else:
            self.blocks = ResidualStack(make_f, make_g, depth=c.depth, rngs=rngs)
        width = 2 * c.dim if c.reversible else c.dim
        self.norm = layers.layer_norm(width, rngs, **kw)
        self.head = layers.dense(width, c.num_classes, rngs, **kw)

    def features(self, x: jax.Array, *, mode: str | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Pooled, normalised features: (batch, 2C) for Rev-ViT, (batch, C) for ViT."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        h = self.patch_embed(x) + self.pos_embed.value.astype(c.dtype or c.param_dtype)
        keys = layers.layer_keys(rngs, c.depth) if (c.drop_rate or c.drop_path_rate) else {}
        if c.reversible:
            h = jnp.concatenate(self.blocks(h, h, per_layer=keys, mode=mode), axis=-1)
        else:
            h = self.blocks(h, per_layer=keys)
        return self.norm(h.mean(axis=1))

    def __call__(self, x: jax.Array, *, mode: str | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits for NHWC images ``x`` of shape (batch, img_size, img_size, in_chans).

        ``mode`` overrides the backward mode for this call; ``rngs`` (with a ``dropout``
        stream) turns on dropout/drop-path, with per-layer keys the backward replays exactly.
        """
        return self.head(self.features(x, mode=mode, rngs=rngs))


register_family("vit", ViTConfig, VisionTransformer, VARIANTS)
