"""Rev-MViT (Mangalam et al., 2022, "Reversible Vision Transformers") on MViTv2 and its
standard MViTv2 twin (Li et al., 2022, "MViTv2: Improved Multiscale Vision Transformers for
Classification and Detection"), image classification.

Images (NHWC) are embedded by an overlapping 7x7 convolution of stride 4 (padding 3) into a
(batch, H/4, W/4, C) map; four stages follow at widths C, 2C, 4C, 8C, heads h, 2h, 4h, 8h and
resolutions H/4 .. H/32. Every block's attention is *pooling attention*: after the fused
``qkv`` projection, Q, K and V are each pooled by a depthwise 3x3 convolution (shared by the
heads, no bias) and layer-normalised per head; K and V with stride ``kv_stride`` (4 in stage 1,
halved at each later stage, at least 1), Q with stride 1. Logits get MViTv2's decomposed
relative position embedding, ``q . R_h[dy] + q . R_w[dx]`` from two learned tables of
(2 max(q side, kv side) - 1, head dim) rows, and the pooled Q is added to the attention
output (residual pooling) before ``proj``.

The first block of stages 2-4 is MViTv2's *stage transition*: it pools Q by 2 (halving the
map) and changes width and heads: LayerNorm(C_in), pooling attention to C_out, a shortcut
``shortcut_proj`` Linear(C_in, C_out) of the normalised input max-pooled 3x3/2 (padding 1),
then LayerNorm + MLP with its own residual. It cannot be inverted and runs under plain
autodiff (``Stage.transition``); the stage's other blocks keep shape and form its reversible
stack: F = LayerNorm + pooling attention, G = LayerNorm + MLP. ``depths`` counts blocks per
stage as MViTv2 does (transition included), so stage i > 1 has a stack of depth depths[i] - 1.

In Rev-MViT the two streams are fused before each transition (``fusion``, see
``revjax.stages``). The default, ``concat``, hands the transition both streams side by side
(width 2C_in): its own input projections (``qkv``, ``shortcut_proj``) then do the fusion, with
no extra module. This is our choice: minREV's ``revmvit.py`` has no working fusion (its
transition receives the wrong input), and we found none stated in the paper's text.
Head: the last stage's streams side by side (2C, or C in the twin) -> LayerNorm -> mean over
positions -> classifier, as MViTv2 (timm's ``mvitv2_*``: no class token, no absolute
position embedding).

Stochastic depth follows MViTv2: the rate grows linearly from 0 to ``drop_path_rate`` over
all blocks, transitions included (a per-layer input of each stack).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from .. import layers
from ..stages import Stage, check_fusion, concat, start
from .registry import register_family
from .config import resolve_mode, stack_options


@dataclasses.dataclass(frozen=True)
class MViTConfig:
    name: str
    reversible: bool
    dim: int  # stage 1's width; doubles at each transition
    depths: tuple[int, ...]  # blocks per stage, each later stage's transition included
    heads: int = 1  # stage 1's heads; double at each transition
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 4  # the patch embedding's stride
    patch_kernel: int = 7  # its kernel (padding patch_kernel // 2)
    pool_kernel: int = 3  # Q/K/V pooling convolutions' kernel
    kv_stride: int = 4  # stage 1's K/V pooling stride; halved (>= 1) at each transition
    in_chans: int = 3
    num_classes: int = 1000
    fusion: str = "concat"  # two-stream fusion before each transition (reversible)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # the last block's; linear from 0 over all blocks
    dtype: Any = None  # compute dtype (None: the parameters')
    param_dtype: Any = jnp.float32
    stream_dtype: Any = None  # residual streams' dtype (None: the compute dtype); reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible

    def __post_init__(self):
        if isinstance(self.depths, list):
            object.__setattr__(self, "depths", tuple(self.depths))


# (C, depths): Li et al., 2022, Table 1 / Appendix (MViTv2-T, S, B; one head in stage 1, heads
# and width doubling per stage); timm's mvitv2_tiny/small/base.
VARIANTS = {
    "t": dict(dim=96, depths=(1, 2, 5, 2)),
    "s": dict(dim=96, depths=(1, 2, 11, 2)),
    "b": dict(dim=96, depths=(2, 3, 16, 3)),
    "test": dict(dim=16, depths=(2, 3, 2), img_size=32, num_classes=10),
}


# ----------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class StageGeometry:
    """One stage: its map side ``resolution`` (after the transition), width, heads, K/V
    pooling stride; ``in_resolution`` and ``in_dim`` are what its transition receives
    (stage 1: the patch embedding's map, no transition)."""

    resolution: int
    dim: int
    heads: int
    kv_stride: int
    in_resolution: int
    in_dim: int


def geometry(c: MViTConfig) -> tuple[StageGeometry, ...]:
    """Every stage's geometry; raises if a depth is too small or the image does not divide
    into the patch embedding's stride, each transition's Q pooling by 2 and each stage's K/V
    pooling."""
    if not c.depths or any(not isinstance(d, int) for d in c.depths):
        raise ValueError(f"depths must be a non-empty tuple of ints, got {c.depths}")
    if c.depths[0] < 1 or any(d < 2 for d in c.depths[1:]):
        raise ValueError(
            f"depths {c.depths}: stage 1 needs >= 1 block and every later stage >= 2 (its "
            "first block is the pooling transition, the rest its reversible stack)")
    if c.dim % c.heads:
        raise ValueError(f"dim {c.dim} is not divisible by heads {c.heads}")
    if c.pool_kernel < 1 or c.pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd int, got {c.pool_kernel}")
    if c.kv_stride < 1:
        raise ValueError(f"kv_stride must be positive, got {c.kv_stride}")
    for name in ("drop_rate", "drop_path_rate"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}")
    check_fusion(c.fusion)
    if c.img_size % c.patch_size:
        raise ValueError(f"img_size {c.img_size} is not divisible by patch_size "
                         f"{c.patch_size}")
    res, stride, out = c.img_size // c.patch_size, c.kv_stride, []
    in_res, in_dim = res, c.dim
    for i in range(len(c.depths)):
        if i:
            if res % 2:
                raise ValueError(f"img_size {c.img_size}: stage {i}'s {res}x{res} map cannot "
                                 "be pooled by 2")
            in_res, in_dim = res, out[-1].dim
            res, stride = res // 2, max(stride // 2, 1)
        for side in {in_res, res}:
            if side % stride:
                raise ValueError(f"img_size {c.img_size}: stage {i + 1}'s {side}x{side} map "
                                 f"is not divisible by its K/V pooling stride {stride}")
        out.append(StageGeometry(res, c.dim * 2 ** i, c.heads * 2 ** i, stride, in_res,
                                 in_dim))
    return tuple(out)


@functools.cache
def rel_pos_index(q_side: int, k_side: int) -> np.ndarray:
    """(q_side, k_side): the row of a relative position table for query row y and key row u,
    MViTv2's ``y * max(k/q, 1) - u * max(q/k, 1) + (k - 1) * max(q/k, 1)``: offsets measured
    on the finer of the two grids, shifted to start at 0."""
    q_ratio, k_ratio = max(k_side / q_side, 1.0), max(q_side / k_side, 1.0)
    dist = (np.arange(q_side)[:, None] * q_ratio - np.arange(k_side)[None, :] * k_ratio
            + (k_side - 1) * k_ratio)
    index = dist.astype(np.int32)
    index.setflags(write=False)
    return index


def drop_path_rates(c: MViTConfig) -> list[np.ndarray]:
    """MViTv2's stochastic-depth rule: rates linear from 0 to ``drop_path_rate`` over all
    blocks, split per stage (a later stage's first rate is its transition's)."""
    rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).astype(np.float32)
    return np.split(rates, np.cumsum(c.depths)[:-1])


# ------------------------------------------------------------------------- layers


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A depthwise convolution, padding k // 2, as a sum of k^2 strided slices scaled per
    channel: x (N, H, W, C), kernel (k, k, 1, C) (``nnx.Conv``'s layout with
    ``feature_group_count=C``). The same function as the grouped convolution, several times
    faster forward and backward on XLA:CPU, whose grouped convolutions are slow."""
    k, n, h, w, c = kernel.shape[0], *x.shape
    p = k // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    kernel = kernel.astype(x.dtype)
    out = None
    for a in range(k):
        for b in range(k):
            tap = lax.slice(x, (0, a, b, 0), (n, a + (ho - 1) * stride + 1,
                                              b + (wo - 1) * stride + 1, c),
                            (1, stride, stride, 1)) * kernel[a, b, 0]
            out = tap if out is None else out + tap
    return out


def _pool_conv(dim: int, kernel: int, stride: int, rngs, dtype, param_dtype):
    """A depthwise ``kernel`` x ``kernel`` convolution, padding kernel // 2, no bias; None
    when it would be the identity (kernel and stride 1, as MViTv2 skips it)."""
    if kernel == 1 and stride == 1:
        return None
    return nnx.Conv(dim, dim, (kernel, kernel), strides=stride,
                    padding=((kernel // 2, kernel // 2),) * 2, feature_group_count=dim,
                    use_bias=False, kernel_init=layers.init_w, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class PoolingAttention(nnx.Module):
    """MViTv2's multi-head pooling attention from ``dim_in`` to ``dim_out`` on a
    (batch, side, side, dim_in) map of side ``size``: fused ``qkv``, Q/K/V pooling
    (``pool_{q,k,v}`` depthwise convolutions shared by the heads, then ``norm_{q,k,v}``
    LayerNorm(head dim)), decomposed relative positions ``rel_pos_h``/``rel_pos_w``, residual
    pooling, output ``proj``. Returns a (batch, size / q_stride, ..., dim_out) map."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, *, rngs: nnx.Rngs,
                 q_stride: int = 1, kv_stride: int = 1, kernel: int = 3, dtype=None,
                 param_dtype=jnp.float32):
        if dim_out % heads:
            raise ValueError(f"dim {dim_out} is not divisible by heads {heads}")
        self.heads, self.size = heads, size
        self.q_stride, self.kv_stride = q_stride, kv_stride
        d = dim_out // heads
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkv = layers.dense(dim_in, 3 * dim_out, rngs, **kw)
        self.proj = layers.dense(dim_out, dim_out, rngs, **kw)
        self.pool_q = _pool_conv(d, kernel, q_stride, rngs, **kw)
        self.pool_k = _pool_conv(d, kernel, kv_stride, rngs, **kw)
        self.pool_v = _pool_conv(d, kernel, kv_stride, rngs, **kw)
        self.norm_q, self.norm_k, self.norm_v = (
            None if pool is None else layers.layer_norm(d, rngs, **kw)
            for pool in (self.pool_q, self.pool_k, self.pool_v))
        rows = 2 * max(size // q_stride, size // kv_stride) - 1
        self.rel_pos_h = nnx.Param(layers.init_w(rngs.params(), (rows, d), param_dtype))
        self.rel_pos_w = nnx.Param(layers.init_w(rngs.params(), (rows, d), param_dtype))

    def _pool(self, t, pool, norm):
        """(b, H, W, heads, d) -> pooled (b, heads, H', W', d), the heads folded into the
        batch for the shared depthwise convolution."""
        b, h, w, n, d = t.shape
        t = t.transpose(0, 3, 1, 2, 4)
        if pool is None:
            return t
        stride = pool.strides if isinstance(pool.strides, int) else pool.strides[0]
        t = norm(depthwise_conv(t.reshape(b * n, h, w, d), pool.kernel[...], stride))
        return t.reshape(b, n, *t.shape[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        if (h, w) != (self.size, self.size):
            raise ValueError(f"pooling attention built for a {self.size}x{self.size} map, "
                             f"got {h}x{w}")
        n = self.heads
        qkv = self.qkv(x).reshape(b, h, w, 3, n, -1)
        q = self._pool(qkv[:, :, :, 0], self.pool_q, self.norm_q)  # (b, n, qh, qw, d)
        k = self._pool(qkv[:, :, :, 1], self.pool_k, self.norm_k)  # (b, n, kh, kw, d)
        v = self._pool(qkv[:, :, :, 2], self.pool_v, self.norm_v)
        (qh, qw), (kh, kw), d = q.shape[2:4], k.shape[2:4], q.shape[-1]
        acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 (or wider) logits and softmax
        logits = jnp.einsum("bnyxd,bnuvd->bnyxuv", q * d**-0.5, k, preferred_element_type=acc)
        rel_h = self.rel_pos_h[...][rel_pos_index(qh, kh)]  # (qh, kh, d)
        rel_w = self.rel_pos_w[...][rel_pos_index(qw, kw)]  # (qw, kw, d)
        rel_h = jnp.einsum("bnyxd,yud->bnyxu", q, rel_h.astype(q.dtype),
                           preferred_element_type=acc)
        rel_w = jnp.einsum("bnyxd,xvd->bnyxv", q, rel_w.astype(q.dtype),
                           preferred_element_type=acc)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, n, qh * qw, kh * kw)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bnkd->bnqd", attn, v.reshape(b, n, kh * kw, d))
        out = out + q.reshape(b, n, qh * qw, d)  # residual pooling
        out = out.reshape(b, n, qh, qw, d).transpose(0, 2, 3, 1, 4).reshape(b, qh, qw, n * d)
        return self.proj(out)


class PoolingAttentionHalf(nnx.Module):
    """F = LayerNorm + pooling attention (Q unpooled: the map keeps its shape), on a
    (batch, side, side, dim) map. Per-layer inputs for training: ``key`` and ``drop_path``
    (this block's rate)."""

    def __init__(self, dim: int, heads: int, size: int, *, rngs: nnx.Rngs, kv_stride: int,
                 kernel: int = 3, drop_rate: float = 0.0, dtype=None,
                 param_dtype=jnp.float32):
        self.norm = layers.layer_norm(dim, rngs, dtype, param_dtype)
        self.attn = PoolingAttention(dim, dim, heads, size, rngs=rngs, kv_stride=kv_stride,
                                     kernel=kernel, dtype=dtype, param_dtype=param_dtype)
        self.drop_rate = drop_rate

    def __call__(self, x, *_, key=None, drop_path=None, **__):
        return layers.branch_dropout(self.attn(self.norm(x)), self.drop_rate, drop_path, key, 0)


class TransitionBlock(nnx.Module):
    """MViTv2's stage transition: Q pooled by 2, width ``dim_in`` -> ``dim_out``.

    ``x -> s + A(norm1(x))``, with ``s`` = max-pool 3x3/2 (padding 1) of ``shortcut_proj``
    (norm1(x)), then ``x -> x + mlp(norm2(x))``. MViTv2 projects the shortcut when the width
    changes, which it does at every transition; we always project, so that with the ``concat``
    fusion (input 2 C_in = C_out wide) the projection still mixes the two streams. Dropout and
    drop-path as in the halves, from ``key`` and the rate ``drop_path``.
    """

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, *, rngs: nnx.Rngs,
                 kv_stride: int, kernel: int = 3, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(dim_in, rngs, **kw)
        self.attn = PoolingAttention(dim_in, dim_out, heads, size, rngs=rngs, q_stride=2,
                                     kv_stride=kv_stride, kernel=kernel, **kw)
        self.shortcut_proj = layers.dense(dim_in, dim_out, rngs, **kw)
        self.norm2 = layers.layer_norm(dim_out, rngs, **kw)
        self.mlp = layers.Mlp(dim_out, int(dim_out * mlp_ratio), rngs=rngs, **kw)
        self.drop_rate = drop_rate

    def __call__(self, x: jax.Array, *, key=None, drop_path=None) -> jax.Array:
        x_norm = self.norm1(x)
        skip = self.shortcut_proj(x_norm)
        skip = nnx.max_pool(skip, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = skip + layers.branch_dropout(self.attn(x_norm), self.drop_rate, drop_path, key, 0)
        return x + layers.branch_dropout(self.mlp(self.norm2(x)), self.drop_rate, drop_path,
                                         key, 1)


class PatchEmbed(layers.PatchEmbed):
    """MViTv2's overlapping patch embedding (7x7, stride 4, padding 3), as a (batch, H/4,
    W/4, C) map."""

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = super().__call__(x)
        side = self.img_size // self.patch_size
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


# -------------------------------------------------------------------------- model


class MViT(nnx.Module):
    """MViTv2 whose stages are ``RevStack`` s (``config.reversible``) or residual blocks.

    Parameter paths: ``patch_embed.proj``, ``stages.<i>.blocks.{f,g}`` (stacked over the
    stage's reversible depth), ``stages.<i>.fusion`` and ``stages.<i>.transition.{norm1,
    attn, shortcut_proj, norm2, mlp}`` for i >= 1, ``norm``, ``head``.
    """

    def __init__(self, config: MViTConfig, *, rngs: nnx.Rngs, mode: str | None = None):
        self.config = c = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.geometry = geo = geometry(config)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim, rngs=rngs,
                                      kernel_size=c.patch_kernel,
                                      padding=c.patch_kernel // 2, **kw)
        stages = []
        for i, g in enumerate(geo):
            make_f = functools.partial(PoolingAttentionHalf, g.dim, g.heads, g.resolution,
                                       kv_stride=g.kv_stride, kernel=c.pool_kernel,
                                       drop_rate=c.drop_rate, **kw)
            make_g = functools.partial(layers.MlpHalf, g.dim, int(g.dim * c.mlp_ratio),
                                       drop_rate=c.drop_rate, **kw)
            transition = functools.partial(_transition, g=g, c=c, **kw) if i else None
            stages.append(Stage(lambda r, mk=make_f: mk(rngs=r),
                                lambda r, mk=make_g: mk(rngs=r), depth=stack_depth(c, i),
                                rngs=rngs, reversible=c.reversible, mode=self.mode,
                                make_transition=transition, in_dim=g.in_dim if i else None,
                                fusion=c.fusion, stack_options=numerics, **kw))
        self.stages = nnx.List(stages)
        width = 2 * geo[-1].dim if c.reversible else geo[-1].dim
        self.norm = layers.layer_norm(width, rngs, **kw)
        self.head = layers.dense(width, c.num_classes, rngs, **kw)

    def stage_inputs(self, i: int, rngs: nnx.Rngs | None = None) -> tuple[dict | None, dict]:
        """Stage i's (per-layer inputs of its stack, keyword arguments of its transition):
        with ``rngs`` and a non-zero rate, dropout ``key`` s and ``drop_path`` rates."""
        c = self.config
        if rngs is None or not (c.drop_rate or c.drop_path_rate):
            return None, {}
        depth = stack_depth(c, i)
        per_layer = layers.layer_keys(rngs, depth)
        transition = {"key": rngs.dropout()} if i else {}
        if c.drop_path_rate:
            rates = jnp.asarray(drop_path_rates(c)[i])
            per_layer["drop_path"] = rates[1:] if i else rates
            if i:
                transition["drop_path"] = rates[0]
        return per_layer, transition

    def features(self, x: jax.Array, *, mode: str | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """Normalised, pooled features: (batch, 2 * C_last) for Rev-MViT, (batch, C_last)."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        streams = start(self.patch_embed(x), c.reversible)
        for i, stage in enumerate(self.stages):
            per_layer, transition_kw = self.stage_inputs(i, rngs)
            streams = stage(streams, per_layer=per_layer, transition_kw=transition_kw,
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


def stack_depth(c: MViTConfig, i: int) -> int:
    """Blocks in stage i's stack: all of stage 1's, the others' but their transition."""
    return c.depths[i] - (1 if i else 0)


def _transition(width: int, rngs: nnx.Rngs, *, g: StageGeometry, c: MViTConfig,
                **kw) -> TransitionBlock:
    return TransitionBlock(width, g.dim, g.heads, g.in_resolution, rngs=rngs,
                           kv_stride=g.kv_stride, kernel=c.pool_kernel,
                           mlp_ratio=c.mlp_ratio, drop_rate=c.drop_rate, **kw)


register_family("mvit", MViTConfig, MViT, VARIANTS)
