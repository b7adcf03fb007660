"""Rev-Swin (Mangalam et al., 2022; Zhu et al., 2023) and its standard Swin twin (Liu et al.,
2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows").

Images (NHWC) are cut into 4x4 patches, embedded and layer-normalised; four stages follow at
widths C, 2C, 4C, 8C and resolutions H/4 .. H/32. A stage is a stack of layers with
F = LayerNorm + window attention (multi-head self-attention inside non-overlapping M x M
windows, plus a relative position bias looked up in a learned ((2M-1)^2, heads) table) and
G = LayerNorm + MLP. Every second layer of a stage shifts the windows by M // 2: the map is
rolled by -M // 2 before the partition and back after, and an additive mask keeps tokens that
the roll brought together from across the border from attending to each other.

The shift and the mask are *per-layer inputs* of the stack (stacked over depth; unshifted
layers get shift 0 and an all-zero mask), so one scan serves a stage of any depth, odd
included. A stage whose map fits in one window (7x7 at 224 px, stage 4) uses a window of the
map's size and never shifts, as in Swin.

Between stages the non-reversible transition is Swin's patch merging (2x2 neighbourhood
concatenated, LayerNorm(4C), Linear(4C, 2C) without bias); in Rev-Swin the two streams are
fused first (``fusion``, see ``revjax.stages``). The default, ``concat_mlp`` (concatenation,
then an MLP 2C -> 2C -> C), is the fusion of the Rev-Swin reference code by the Rev-ViT and
PaReprop authors (minREV, ``revswin.py``); we found no statement of it in the papers' text.
Head: the last stage's streams side by side (2C, or C in the standard twin) -> LayerNorm ->
mean over positions -> classifier, the order of Swin's own head. Swin has no absolute
position embedding; neither do we.

Stochastic depth follows Swin's rule: the drop-path rate grows linearly from 0 to
``drop_path_rate`` over all layers of all stages (a per-layer input, like the shift).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import layers
from ..stages import Stage, check_fusion, concat, start
from .registry import register_family
from .config import resolve_mode, stack_options

MASK_VALUE = -1e9  # additive bias between tokens that must not attend (exp underflows to 0)


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    name: str
    reversible: bool
    dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    window_size: int = 7
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    fusion: str = "concat_mlp"  # two-stream fusion before each patch merging (reversible)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # the last layer's; linear from 0 over all layers
    dtype: Any = None  # compute dtype (None: the parameters')
    param_dtype: Any = jnp.float32
    stream_dtype: Any = None  # residual streams' dtype (None: the compute dtype); reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible

    def __post_init__(self):
        for name in ("depths", "heads"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple))
                               else value)


# (C, depths, heads): Liu et al., 2021, Section 3.3 (head width 32 throughout).
VARIANTS = {
    "t": dict(dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    "s": dict(dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24)),
    "b": dict(dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32)),
    "l": dict(dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48)),
    "test": dict(dim=16, depths=(2, 1), heads=(1, 2), img_size=32, patch_size=2,
                 window_size=4, num_classes=10),
}


# ----------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class StageGeometry:
    """A stage's square feature map (``resolution``), width, window side and shift."""

    resolution: int
    dim: int
    window: int
    shift: int


def geometry(c: SwinConfig) -> tuple[StageGeometry, ...]:
    """Every stage's geometry; raises if the image does not tile into patches, 2x2 merges
    and windows at every stage."""
    if not c.depths or len(c.depths) != len(c.heads):
        raise ValueError(f"depths {c.depths} and heads {c.heads} must be non-empty tuples of "
                         "one entry per stage")
    if any(not isinstance(d, int) or d < 1 for d in c.depths):
        raise ValueError(f"depths must be positive ints, got {c.depths}")
    if c.img_size % c.patch_size:
        raise ValueError(f"img_size {c.img_size} is not divisible by patch_size "
                         f"{c.patch_size}")
    if c.window_size < 1:
        raise ValueError(f"window_size must be positive, got {c.window_size}")
    for name in ("drop_rate", "drop_path_rate"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    check_fusion(c.fusion)
    res, out = c.img_size // c.patch_size, []
    for i in range(len(c.depths)):
        if i:
            if res % 2:
                raise ValueError(f"img_size {c.img_size}: stage {i - 1}'s {res}x{res} map "
                                 "cannot be merged 2x2")
            res //= 2
        window = min(c.window_size, res)
        if res % window:
            raise ValueError(f"img_size {c.img_size}: stage {i}'s {res}x{res} map is not "
                             f"divisible into {window}x{window} windows")
        shift = window // 2 if res > c.window_size else 0
        out.append(StageGeometry(res, c.dim * 2 ** i, window, shift))
    return tuple(out)


def relative_position_index(window: int) -> np.ndarray:
    """(N, N) with N = window^2: the row of the bias table for query i and key j, from their
    offset (dy, dx) in [-(M-1), M-1]^2: ``(dy + M - 1) * (2M - 1) + dx + M - 1``."""
    y, x = np.divmod(np.arange(window * window), window)
    dy = y[:, None] - y[None, :] + window - 1
    dx = x[:, None] - x[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * H/M * W/M, M*M, C); windows and tokens in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(x, window: int, h: int, w: int):
    """The inverse of ``window_partition``: (B * nW, M*M, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, N, N) additive attention bias for a layer whose map is rolled by ``-shift``.

    Rolled position p holds original position (p + shift) mod R, which wrapped around the
    border iff p >= R - shift. Two tokens of one window may attend iff they wrapped alike in
    both axes (then they are neighbours in the original map): bias 0, else ``MASK_VALUE``.
    """
    wrapped = (np.arange(resolution) >= resolution - shift).astype(np.int32)
    region = 2 * wrapped[:, None] + wrapped[None, :]  # (R, R): wrap flags in (y, x)
    labels = window_partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
    same = labels[:, :, None] == labels[:, None, :]
    return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


@functools.cache
def stage_inputs(g: StageGeometry, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-layer shifts (depth,) and masks (depth, nW, N, N) of a stage: layer i shifts
    iff i is odd (and the stage shifts at all); unshifted layers get an all-zero mask."""
    shifts = np.array([g.shift if i % 2 else 0 for i in range(depth)], np.int32)
    zero = shift_mask(g.resolution, g.window, 0)
    shifted = shift_mask(g.resolution, g.window, g.shift)
    masks = np.stack([shifted if s else zero for s in shifts])
    shifts.setflags(write=False)
    masks.setflags(write=False)
    return shifts, masks


def drop_path_rates(c: SwinConfig) -> list[np.ndarray]:
    """Swin's stochastic-depth rule: rates linear from 0 to ``drop_path_rate`` over all
    layers, split per stage."""
    rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).astype(np.float32)
    return np.split(rates, np.cumsum(c.depths)[:-1])


# ------------------------------------------------------------------------- layers


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows, with a fused ``qkv``, an output ``proj`` and
    a learned relative position bias ``relative_position_bias_table`` ((2M-1)^2, heads)."""

    def __init__(self, dim: int, heads: int, window: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.window = heads, window
        self.qkv = layers.dense(dim, 3 * dim, rngs, dtype, param_dtype)
        self.proj = layers.dense(dim, dim, rngs, dtype, param_dtype)
        self.relative_position_bias_table = nnx.Param(
            layers.init_w(rngs.params(), ((2 * window - 1) ** 2, heads), param_dtype))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (batch * nW, M*M, dim), windows in row-major order per image; mask: optional
        (nW, M*M, M*M) additive bias (``shift_mask``)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, d)
        acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 (or wider) logits and softmax
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
        logits = logits * (c // self.heads) ** -0.5
        bias = self.relative_position_bias_table[...][relative_position_index(self.window)]
        logits = logits + bias.astype(acc).transpose(2, 0, 1)  # (h, n, n)
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(b // nw, nw, self.heads, n, n)
            logits = (logits + mask[None, :, None].astype(acc)).reshape(b, self.heads, n, n)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return self.proj(out)


class WindowAttentionHalf(nnx.Module):
    """F = LayerNorm + (shifted) window attention, on a (batch, H, W, C) map.

    Per-layer inputs: ``shift`` (an int, may be traced: the map is rolled by ``-shift`` before
    the window partition and back after), ``mask`` (``shift_mask`` for that shift), and for
    training ``key`` and ``drop_path`` (this layer's rate).
    """

    def __init__(self, dim: int, heads: int, window: int, *, rngs: nnx.Rngs,
                 drop_rate: float = 0.0, dtype=None, param_dtype=jnp.float32):
        self.norm = layers.layer_norm(dim, rngs, dtype, param_dtype)
        self.attn = WindowAttention(dim, heads, window, rngs=rngs, dtype=dtype,
                                    param_dtype=param_dtype)
        self.window, self.drop_rate = window, drop_rate

    def __call__(self, x, *_, shift=0, mask=None, key=None, drop_path=None, **__):
        _, h, w, _ = x.shape
        y = jnp.roll(self.norm(x), (-shift, -shift), axis=(1, 2))
        y = self.attn(window_partition(y, self.window), mask)
        y = jnp.roll(window_merge(y, self.window, h, w), (shift, shift), axis=(1, 2))
        return layers.branch_dropout(y, self.drop_rate, drop_path, key, 0)


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods concatenated (offsets (0,0), (1,0), (0,1), (1,1) in (y, x), Swin's
    order) -> LayerNorm(4 * in) -> ``reduction`` Linear(4 * in, out), no bias."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.norm = layers.layer_norm(4 * in_dim, rngs, dtype, param_dtype)
        self.reduction = nnx.Linear(4 * in_dim, out_dim, use_bias=False,
                                    kernel_init=layers.init_w, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)  # (.., dx, dy, c)
        return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class PatchEmbed(layers.PatchEmbed):
    """Swin's patch embedding: the shared ``PatchEmbed`` then LayerNorm, as a (batch, H/p,
    W/p, C) map."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        super().__init__(img_size, patch_size, in_chans, dim, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.norm = layers.layer_norm(dim, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = super().__call__(x)
        side = self.img_size // self.patch_size
        return self.norm(tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1]))


# -------------------------------------------------------------------------- model


class SwinTransformer(nnx.Module):
    """Swin whose stages are ``RevStack`` s (``config.reversible``) or residual blocks.

    Parameter paths: ``patch_embed.{proj,norm}``, ``stages.<i>.blocks.{f,g}`` (stacked over
    the stage's depth), ``stages.<i>.fusion`` and ``stages.<i>.transition.{norm,reduction}``
    for i >= 1, ``norm``, ``head``.
    """

    def __init__(self, config: SwinConfig, *, rngs: nnx.Rngs, mode: str | None = None):
        self.config = c = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.geometry = geo = geometry(config)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim, rngs=rngs,
                                      **kw)
        stages = []
        for i, (g, depth, heads) in enumerate(zip(geo, c.depths, c.heads)):
            make_f = functools.partial(WindowAttentionHalf, g.dim, heads, g.window,
                                       drop_rate=c.drop_rate, **kw)
            make_g = functools.partial(layers.MlpHalf, g.dim, int(g.dim * c.mlp_ratio),
                                       drop_rate=c.drop_rate, **kw)
            merge = functools.partial(_merging, out_dim=g.dim, **kw) if i else None
            stages.append(Stage(lambda r, mk=make_f: mk(rngs=r),
                                lambda r, mk=make_g: mk(rngs=r), depth=depth, rngs=rngs,
                                reversible=c.reversible, mode=self.mode,
                                make_transition=merge, in_dim=geo[i - 1].dim if i else None,
                                fusion=c.fusion, stack_options=numerics, **kw))
        self.stages = nnx.List(stages)
        width = 2 * geo[-1].dim if c.reversible else geo[-1].dim
        self.norm = layers.layer_norm(width, rngs, **kw)
        self.head = layers.dense(width, c.num_classes, rngs, **kw)

    def per_layer(self, i: int, rngs: nnx.Rngs | None = None) -> dict:
        """Stage i's per-layer inputs: ``shift``, ``mask`` and, with ``rngs`` and a non-zero
        rate, dropout ``key`` s and the ``drop_path`` rates."""
        c = self.config
        shifts, masks = stage_inputs(self.geometry[i], c.depths[i])
        out = {"shift": jnp.asarray(shifts), "mask": jnp.asarray(masks)}
        if rngs is not None and (c.drop_rate or c.drop_path_rate):
            out.update(layers.layer_keys(rngs, c.depths[i]))
            if c.drop_path_rate:
                out["drop_path"] = jnp.asarray(drop_path_rates(c)[i])
        return out

    def features(self, x: jax.Array, *, mode: str | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Normalised, pooled features: (batch, 2 * C_last) for Rev-Swin, (batch, C_last)."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        streams = start(self.patch_embed(x), c.reversible)
        for i, stage in enumerate(self.stages):
            streams = stage(streams, per_layer=self.per_layer(i, rngs),
                            mode=mode if c.reversible else None)
        return self.norm(concat(streams)).mean(axis=(1, 2))

    def __call__(self, x: jax.Array, *, mode: str | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits for NHWC images ``x`` of shape (batch, img_size, img_size, in_chans).

        ``mode`` overrides the backward mode for this call (standard twins: backprop only);
        ``rngs`` (with a ``dropout`` stream) turns on dropout/drop-path, with per-layer keys
        the backward replays exactly.
        """
        return self.head(self.features(x, mode=mode, rngs=rngs))


def _merging(width: int, rngs: nnx.Rngs, *, out_dim: int, **kw) -> PatchMerging:
    return PatchMerging(width, out_dim, rngs=rngs, **kw)


register_family("swin", SwinConfig, SwinTransformer, VARIANTS)
