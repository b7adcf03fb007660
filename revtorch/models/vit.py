"""Rev-ViT (Mangalam et al., 2022) and its standard ViT twin (Dosovitskiy et al., 2021).

Patch embedding + learned position embedding (no class token); the reversible encoder starts
both streams from the embedding, F = LayerNorm + attention, G = LayerNorm + MLP; the head
mean-pools the concatenated streams (width 2C), applies LayerNorm and the classifier. The
standard twin runs the same F and G as pre-norm residual blocks on one stream (width C).

Dtypes: ``param_dtype`` is applied by building in float32 and casting (``.to``). The compute
dtype ``dtype`` is either None / the parameters' dtype (the images are cast to it), or a
lower precision (``torch.bfloat16``, ``torch.float16``) run under ``torch.autocast``, with the
two streams kept in that dtype as in revjax (autocast keeps LayerNorm and softmax in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor, nn

from .. import layers
from ..stack import ResidualStack, RevStack
from .registry import register_family
from .config import check_dtypes, compute_context, resolve_mode, stack_options



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
    dtype: torch.dtype | None = None  # compute dtype (None: the parameters')
    param_dtype: torch.dtype = torch.float32
    stream_dtype: str | torch.dtype | None = None  # residual streams' dtype; reversible
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


class VisionTransformer(nn.Module):
    """A ViT whose encoder is a ``RevStack`` (``config.reversible``) or residual blocks.

    Dropout and drop-path (``drop_rate``, ``drop_path_rate``) are on in training mode: each
    call then draws one int64 key per layer from torch's default generator and passes it to
    the encoder as a per-layer input, so reprop/pareprop rebuild the same masks.
    """

    def __init__(self, config: ViTConfig, *, mode: str | None = None) -> None:
        super().__init__()
        c = config
        check_dtypes(c)
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.patch_embed = layers.PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim)
        self.pos_embed = nn.Parameter(
            layers.init_w(torch.empty(1, self.patch_embed.num_patches, c.dim))
        )
        reg = dict(drop_rate=c.drop_rate, drop_path_rate=c.drop_path_rate)
        make_f = lambda: layers.AttentionHalf(c.dim, c.heads, **reg)  # noqa: E731
        make_g = lambda: layers.MlpHalf(c.dim, int(c.dim * c.mlp_ratio), **reg)  # noqa: E731
        if c.reversible:
            self.blocks = RevStack(make_f, make_g, depth=c.depth, mode=self.mode, **numerics)
        else:
            self.blocks = ResidualStack(make_f, make_g, depth=c.depth)
        width = 2 * c.dim if c.reversible else c.dim
        self.norm = layers.layer_norm(width)
        self.head = layers.dense(width, c.num_classes)
        self.to(c.param_dtype)

    def _compute(self, x: Tensor) -> contextlib.AbstractContextManager:
        """Autocast to ``config.dtype`` when it is below the parameters' dtype, else nothing."""
        return compute_context(self.config, self.pos_embed.dtype, x.device)

    def features(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Pooled, normalised features: (batch, 2C) for Rev-ViT, (batch, C) for ViT."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        with self._compute(x):
            h = self.patch_embed(x)
            h = h + self.pos_embed.to(h.dtype)
            train = self.training and (c.drop_rate > 0 or c.drop_path_rate > 0)
            keys = layers.layer_keys(c.depth) if train else {}
            if c.reversible:
                h = torch.cat(self.blocks(h, h, per_layer=keys, mode=mode), dim=-1)
            else:
                h = self.blocks(h, per_layer=keys)
            return self.norm(h.mean(dim=1))

    def forward(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Logits for NCHW images ``x`` of shape (batch, in_chans, img_size, img_size).

        ``mode`` overrides the backward mode for this call (standard twins: backprop only).
        """
        with self._compute(x):
            return self.head(self.features(x, mode=mode))


register_family("vit", ViTConfig, VisionTransformer, VARIANTS)
