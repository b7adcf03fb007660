"""Rev-MViT (Mangalam et al., 2022, "Reversible Vision Transformers") on MViTv2 and its
standard MViTv2 twin (Li et al., 2022, "MViTv2: Improved Multiscale Vision Transformers for
Classification and Detection"), image classification.

Images (NCHW) are embedded by an overlapping 7x7 convolution of stride 4 (padding 3) into a
channels-last (batch, H/4, W/4, C) map; four stages follow at widths C, 2C, 4C, 8C, heads h,
2h, 4h, 8h and resolutions H/4 .. H/32. Every block's attention is *pooling attention*: after
the fused ``qkv`` projection, Q, K and V are each pooled by a depthwise 3x3 convolution
(shared by the heads, no bias) and layer-normalised per head; K and V with stride
``kv_stride`` (4 in stage 1, halved at each later stage, at least 1), Q with stride 1. Logits
get MViTv2's decomposed relative position embedding, ``q . R_h[dy] + q . R_w[dx]`` from two
learned tables of (2 max(q side, kv side) - 1, head dim) rows, and the pooled Q is added to
the attention output (residual pooling) before ``proj``.

The first block of stages 2-4 is MViTv2's *stage transition*: it pools Q by 2 (halving the
map) and changes width and heads: LayerNorm(C_in), pooling attention to C_out, a shortcut
``shortcut_proj`` Linear(C_in, C_out) of the normalised input max-pooled 3x3/2 (padding 1),
then LayerNorm + MLP with its own residual. It cannot be inverted and runs under plain
autograd (``Stage.transition``); the stage's other blocks keep shape and form its reversible
stack: F = LayerNorm + pooling attention, G = LayerNorm + MLP. ``depths`` counts blocks per
stage as MViTv2 does (transition included), so stage i > 1 has a stack of depth depths[i] - 1.

In Rev-MViT the two streams are fused before each transition (``fusion``, see
``revtorch.stages``). The default, ``concat``, hands the transition both streams side by side
(width 2C_in): its own input projections (``qkv``, ``shortcut_proj``) then do the fusion, with
no extra module. This is our choice: minREV's ``revmvit.py`` has no working fusion (its
transition receives the wrong input), and we found none stated in the paper's text.
Head: the last stage's streams side by side (2C, or C in the twin) -> LayerNorm -> mean over
positions -> classifier, as MViTv2 (timm's ``mvitv2_*``: no class token, no absolute
position embedding).

Stochastic depth follows MViTv2: the rate grows linearly from 0 to ``drop_path_rate`` over
all blocks, transitions included (a per-layer input of each stack). The twin of
``revjax/models/mvit.py``; dtypes as in ``vit.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np
import torch
from torch import Tensor, nn

from .. import layers
from ..stages import Stage, check_fusion, concat, start
from .registry import register_family
from .config import check_dtypes, compute_context, resolve_mode, stack_options


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
    dtype: torch.dtype | None = None  # compute dtype (None: the parameters')
    param_dtype: torch.dtype = torch.float32
    stream_dtype: str | torch.dtype | None = None  # residual streams' dtype; reversible
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


# --- geometry -----------------------------------------------------------------------------


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
            "first block is the pooling transition, the rest its reversible stack)"
        )
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
        raise ValueError(f"img_size {c.img_size} is not divisible by patch_size {c.patch_size}")
    res, stride, out = c.img_size // c.patch_size, c.kv_stride, []
    in_res, in_dim = res, c.dim
    for i in range(len(c.depths)):
        if i:
            if res % 2:
                raise ValueError(
                    f"img_size {c.img_size}: stage {i}'s {res}x{res} map cannot be pooled by 2"
                )
            in_res, in_dim = res, out[-1].dim
            res, stride = res // 2, max(stride // 2, 1)
        for side in {in_res, res}:
            if side % stride:
                raise ValueError(
                    f"img_size {c.img_size}: stage {i + 1}'s {side}x{side} map is not "
                    f"divisible by its K/V pooling stride {stride}"
                )
        out.append(
            StageGeometry(res, c.dim * 2**i, c.heads * 2**i, stride, in_res, in_dim)
        )
    return tuple(out)


@functools.cache
def rel_pos_index(q_side: int, k_side: int) -> np.ndarray:
    """(q_side, k_side): the row of a relative position table for query row y and key row u,
    MViTv2's ``y * max(k/q, 1) - u * max(q/k, 1) + (k - 1) * max(q/k, 1)``: offsets measured
    on the finer of the two grids, shifted to start at 0."""
    q_ratio, k_ratio = max(k_side / q_side, 1.0), max(q_side / k_side, 1.0)
    dist = (
        np.arange(q_side)[:, None] * q_ratio
        - np.arange(k_side)[None, :] * k_ratio
        + (k_side - 1) * k_ratio
    )
    index = dist.astype(np.int32)
    index.setflags(write=False)
    return index


def drop_path_rates(c: MViTConfig) -> list[np.ndarray]:
    """MViTv2's stochastic-depth rule: rates linear from 0 to ``drop_path_rate`` over all
    blocks, split per stage (a later stage's first rate is its transition's)."""
    rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).astype(np.float32)
    return np.split(rates, np.cumsum(c.depths)[:-1])


def stack_depth(c: MViTConfig, i: int) -> int:
    """Blocks in stage i's stack: all of stage 1's, the others' but their transition."""
    return c.depths[i] - (1 if i else 0)


# --- layers -------------------------------------------------------------------------------


def _pool_conv(dim: int, kernel: int, stride: int) -> nn.Conv2d | None:
    """A depthwise ``kernel`` x ``kernel`` convolution, padding kernel // 2, no bias; None
    when it would be the identity (kernel and stride 1, as MViTv2 skips it)."""
    if kernel == 1 and stride == 1:
        return None
    conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim,
                     bias=False)
    layers.init_w(conv.weight)
    return conv


class PoolingAttention(nn.Module):
    """MViTv2's multi-head pooling attention from ``dim_in`` to ``dim_out`` on a
    (batch, side, side, dim_in) map of side ``size``: fused ``qkv``, Q/K/V pooling
    (``pool_{q,k,v}`` depthwise convolutions shared by the heads, then ``norm_{q,k,v}``
    LayerNorm(head dim)), decomposed relative positions ``rel_pos_h``/``rel_pos_w``, residual
    pooling, output ``proj``. Returns a (batch, size / q_stride, ..., dim_out) map. The table
    indices are non-persistent buffers (constants, not in the state dict)."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, *, q_stride: int = 1,
                 kv_stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        if dim_out % heads:
            raise ValueError(f"dim {dim_out} is not divisible by heads {heads}")
        self.heads, self.size = heads, size
        self.q_stride, self.kv_stride = q_stride, kv_stride
        d = dim_out // heads
        self.qkv = layers.dense(dim_in, 3 * dim_out)
        self.proj = layers.dense(dim_out, dim_out)
        self.pool_q = _pool_conv(d, kernel, q_stride)
        self.pool_k = _pool_conv(d, kernel, kv_stride)
        self.pool_v = _pool_conv(d, kernel, kv_stride)
        self.norm_q, self.norm_k, self.norm_v = (
            None if pool is None else layers.layer_norm(d)
            for pool in (self.pool_q, self.pool_k, self.pool_v)
        )
        q_side, kv_side = size // q_stride, size // kv_stride
        rows = 2 * max(q_side, kv_side) - 1
        self.rel_pos_h = nn.Parameter(layers.init_w(torch.empty(rows, d)))
        self.rel_pos_w = nn.Parameter(layers.init_w(torch.empty(rows, d)))
        index = torch.tensor(rel_pos_index(q_side, kv_side), dtype=torch.int64)  # a copy
        self.register_buffer("rel_pos_index", index, persistent=False)

    def _pool(self, t: Tensor, pool, norm) -> Tensor:
        """(b, H, W, heads, d) -> pooled (b, heads, H', W', d), the heads folded into the
        batch for the shared depthwise convolution."""
        b, h, w, n, d = t.shape
        t = t.permute(0, 3, 1, 2, 4)
        if pool is None:
            return t
        t = pool(t.reshape(b * n, h, w, d).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = norm(t)
        return t.reshape(b, n, *t.shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        if (h, w) != (self.size, self.size):
            raise ValueError(
                f"pooling attention built for a {self.size}x{self.size} map, got {h}x{w}"
            )
        n = self.heads
        qkv = self.qkv(x).reshape(b, h, w, 3, n, -1)
        q = self._pool(qkv[:, :, :, 0], self.pool_q, self.norm_q)  # (b, n, qh, qw, d)
        k = self._pool(qkv[:, :, :, 1], self.pool_k, self.norm_k)  # (b, n, kh, kw, d)
        v = self._pool(qkv[:, :, :, 2], self.pool_v, self.norm_v)
        (qh, qw), (kh, kw), d = q.shape[2:4], k.shape[2:4], q.shape[-1]
        if (qh, kh) != tuple(self.rel_pos_index.shape):
            raise RuntimeError(f"pooled sides {qh}, {kh} do not match the position table")
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 (or wider) logits, softmax
        logits = torch.einsum("bnyxd,bnuvd->bnyxuv", q * d**-0.5, k).to(acc)
        rel_h = self.rel_pos_h[self.rel_pos_index].to(q.dtype)  # (qh, kh, d); square maps
        rel_w = self.rel_pos_w[self.rel_pos_index].to(q.dtype)  # (qw, kw, d)
        rel_h = torch.einsum("bnyxd,yud->bnyxu", q, rel_h).to(acc)
        rel_w = torch.einsum("bnyxd,xvd->bnyxv", q, rel_w).to(acc)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, n, qh * qw, kh * kw)
        attn = torch.softmax(logits, dim=-1).to(v.dtype)
        out = attn @ v.reshape(b, n, kh * kw, d)
        out = out + q.reshape(b, n, qh * qw, d)  # residual pooling
        out = out.reshape(b, n, qh, qw, d).permute(0, 2, 3, 1, 4).reshape(b, qh, qw, n * d)
        return self.proj(out)


class PoolingAttentionHalf(nn.Module):
    """F = LayerNorm + pooling attention (Q unpooled: the map keeps its shape), on a
    (batch, side, side, dim) map. Per-layer inputs for training: ``key`` and ``drop_path``
    (this block's rate)."""

    def __init__(self, dim: int, heads: int, size: int, *, kv_stride: int, kernel: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = layers.layer_norm(dim)
        self.attn = PoolingAttention(dim, dim, heads, size, kv_stride=kv_stride, kernel=kernel)
        self.drop_rate = drop_rate

    def forward(self, x, *_, key=None, drop_path=None, **__) -> Tensor:
        return layers.branch_dropout(self.attn(self.norm(x)), self.drop_rate, drop_path, key, 0)


class TransitionBlock(nn.Module):
    """MViTv2's stage transition: Q pooled by 2, width ``dim_in`` -> ``dim_out``.

    ``x -> s + A(norm1(x))``, with ``s`` = max-pool 3x3/2 (padding 1) of ``shortcut_proj``
    (norm1(x)), then ``x -> x + mlp(norm2(x))``. MViTv2 projects the shortcut when the width
    changes, which it does at every transition; we always project, so that with the ``concat``
    fusion (input 2 C_in = C_out wide) the projection still mixes the two streams. Dropout and
    drop-path as in the halves, from ``key`` and the rate ``drop_path``.
    """

    def __init__(self, dim_in: int, dim_out: int, heads: int, size: int, *, kv_stride: int,
                 kernel: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = layers.layer_norm(dim_in)
        self.attn = PoolingAttention(dim_in, dim_out, heads, size, q_stride=2,
                                     kv_stride=kv_stride, kernel=kernel)
        self.shortcut_proj = layers.dense(dim_in, dim_out)
        self.norm2 = layers.layer_norm(dim_out)
        self.mlp = layers.Mlp(dim_out, int(dim_out * mlp_ratio))
        self.drop_rate = drop_rate

    def forward(self, x: Tensor, *, key=None, drop_path=None) -> Tensor:
        x_norm = self.norm1(x)
        skip = self.shortcut_proj(x_norm)
        skip = nn.functional.max_pool2d(skip.permute(0, 3, 1, 2), 3, 2, 1).permute(0, 2, 3, 1)
        x = skip + layers.branch_dropout(self.attn(x_norm), self.drop_rate, drop_path, key, 0)
        return x + layers.branch_dropout(
            self.mlp(self.norm2(x)), self.drop_rate, drop_path, key, 1
        )


class PatchEmbed(layers.PatchEmbed):
    """MViTv2's overlapping patch embedding (7x7, stride 4, padding 3), as a channels-last
    (batch, H/4, W/4, C) map."""

    def forward(self, x: Tensor) -> Tensor:
        tokens = super().forward(x)
        side = self.img_size // self.patch_size
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


# --- model --------------------------------------------------------------------------------


class MViT(nn.Module):
    """MViTv2 whose stages are ``RevStack`` s (``config.reversible``) or residual blocks.

    Parameter paths: ``patch_embed.proj``, ``stages.<i>.blocks.{f,g}.<layer>``,
    ``stages.<i>.fusion`` and ``stages.<i>.transition.{norm1, attn, shortcut_proj, norm2,
    mlp}`` for i >= 1, ``norm``, ``head``. Dropout and drop-path are on in training mode: each
    call then draws int64 keys (one per block) from torch's default generator (per-layer
    inputs, replayed exactly by reprop/pareprop).
    """

    def __init__(self, config: MViTConfig, *, mode: str | None = None) -> None:
        super().__init__()
        c = config
        check_dtypes(c)
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.geometry = geo = geometry(config)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim,
                                      kernel_size=c.patch_kernel, padding=c.patch_kernel // 2)
        stages = []
        for i, g in enumerate(geo):
            make_f = functools.partial(PoolingAttentionHalf, g.dim, g.heads, g.resolution,
                                       kv_stride=g.kv_stride, kernel=c.pool_kernel,
                                       drop_rate=c.drop_rate)
            make_g = functools.partial(layers.MlpHalf, g.dim, int(g.dim * c.mlp_ratio),
                                       drop_rate=c.drop_rate)
            transition = functools.partial(_transition, g=g, c=c) if i else None
            stages.append(Stage(make_f, make_g, depth=stack_depth(c, i),
                                reversible=c.reversible, mode=self.mode,
                                make_transition=transition, in_dim=g.in_dim if i else None,
                                fusion=c.fusion,
                                stack_options=numerics))
        self.stages = nn.ModuleList(stages)
        width = 2 * geo[-1].dim if c.reversible else geo[-1].dim
        self.norm = layers.layer_norm(width)
        self.head = layers.dense(width, c.num_classes)
        self.to(c.param_dtype)

    def _compute(self, x: Tensor) -> contextlib.AbstractContextManager:
        """Autocast to ``config.dtype`` when it is below the parameters' dtype, else nothing."""
        return compute_context(self.config, self.head.weight.dtype, x.device)

    def stage_inputs(self, i: int, train: bool = False
                     ) -> tuple[dict[str, Tensor] | None, dict[str, object]]:
        """Stage i's (per-layer inputs of its stack, keyword arguments of its transition):
        when ``train`` and a rate is non-zero, dropout ``key`` s and ``drop_path`` rates
        (CPU)."""
        c = self.config
        if not train or not (c.drop_rate > 0 or c.drop_path_rate > 0):
            return None, {}
        keys = layers.layer_keys(c.depths[i])["key"]  # the transition's first, if any
        per_layer = {"key": keys[1:] if i else keys}
        transition: dict[str, object] = {"key": keys[0]} if i else {}
        if c.drop_path_rate > 0:
            rates = torch.tensor(drop_path_rates(c)[i])
            per_layer["drop_path"] = rates[1:] if i else rates
            if i:
                transition["drop_path"] = rates[0]
        return per_layer, transition

    def features(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Normalised, pooled features: (batch, 2 * C_last) for Rev-MViT, (batch, C_last)."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        with self._compute(x):
            streams = start(self.patch_embed(x), c.reversible)
            for i, stage in enumerate(self.stages):
                per_layer, transition_kw = self.stage_inputs(i, self.training)
                streams = stage(streams, per_layer=per_layer, transition_kw=transition_kw,
                                mode=mode if c.reversible else None)
            return self.norm(concat(streams)).mean(dim=(1, 2))

    def forward(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Logits for NCHW images ``x`` of shape (batch, in_chans, img_size, img_size).

        ``mode`` overrides the backward mode for this call (standard twins: backprop only).
        """
        with self._compute(x):
            return self.head(self.features(x, mode=mode))


def _transition(width: int, *, g: StageGeometry, c: MViTConfig) -> TransitionBlock:
    return TransitionBlock(width, g.dim, g.heads, g.in_resolution, kv_stride=g.kv_stride,
                           kernel=c.pool_kernel, mlp_ratio=c.mlp_ratio, drop_rate=c.drop_rate)


register_family("mvit", MViTConfig, MViT, VARIANTS)
