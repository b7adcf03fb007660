"""Rev-Swin (Mangalam et al., 2022; Zhu et al., 2023) and its standard Swin twin (Liu et al.,
2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows").

Images (NCHW) are cut into 4x4 patches, embedded and layer-normalised; four stages follow at
widths C, 2C, 4C, 8C and resolutions H/4 .. H/32, on channels-last (batch, H, W, C) maps. A
stage is a stack of layers with F = LayerNorm + window attention (multi-head self-attention
inside non-overlapping M x M windows, plus a relative position bias looked up in a learned
((2M-1)^2, heads) table) and G = LayerNorm + MLP. Every second layer of a stage shifts the
windows by M // 2: the map is rolled by -M // 2 before the partition and back after, and an
additive mask keeps tokens that the roll brought together from across the border from
attending to each other.

The shift and the mask are *per-layer inputs* of the stack (stacked over depth; unshifted
layers get shift 0 and an all-zero mask), as in revjax, where one scan serves a stage of any
depth. The shifts are a CPU tensor (reading one is free, no device sync); the masks are
non-persistent buffers of the model (``stage<i>_mask``, not in the state dict). A stage whose
map fits in one window (7x7 at 224 px, stage 4) uses a window of the map's size and never
shifts, as in Swin.

Between stages the non-reversible transition is Swin's patch merging (2x2 neighbourhood
concatenated, LayerNorm(4C), Linear(4C, 2C) without bias); in Rev-Swin the two streams are
fused first (``fusion``, see ``revtorch.stages``). The default, ``concat_mlp`` (concatenation,
then an MLP 2C -> 2C -> C), is the fusion of the Rev-Swin reference code by the Rev-ViT and
PaReprop authors (minREV, ``revswin.py``); we found no statement of it in the papers' text.
Head: the last stage's streams side by side (2C, or C in the standard twin) -> LayerNorm ->
mean over positions -> classifier, the order of Swin's own head. Swin has no absolute
position embedding; neither do we.

Stochastic depth follows Swin's rule: the drop-path rate grows linearly from 0 to
``drop_path_rate`` over all layers of all stages (a per-layer input, like the shift).

Dtypes as in ``vit.py``: ``param_dtype`` by building in float32 and casting; the compute
dtype is None / the parameters' dtype, or bfloat16 / float16 under ``torch.autocast``.
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
    dtype: torch.dtype | None = None  # compute dtype (None: the parameters')
    param_dtype: torch.dtype = torch.float32
    stream_dtype: str | torch.dtype | None = None  # residual streams' dtype; reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible

    def __post_init__(self):
        for name in ("depths", "heads"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))


# (C, depths, heads): Liu et al., 2021, Section 3.3 (head width 32 throughout).
VARIANTS = {
    "t": dict(dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    "s": dict(dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24)),
    "b": dict(dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32)),
    "l": dict(dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48)),
    "test": dict(dim=16, depths=(2, 1), heads=(1, 2), img_size=32, patch_size=2,
                 window_size=4, num_classes=10),
}


# --- geometry -----------------------------------------------------------------------------


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
        raise ValueError(
            f"depths {c.depths} and heads {c.heads} must be non-empty tuples of one entry per "
            "stage"
        )
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in c.depths):
        raise ValueError(f"depths must be positive ints, got {c.depths}")
    if c.img_size % c.patch_size:
        raise ValueError(f"img_size {c.img_size} is not divisible by patch_size {c.patch_size}")
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
                raise ValueError(
                    f"img_size {c.img_size}: stage {i - 1}'s {res}x{res} map cannot be merged 2x2"
                )
            res //= 2
        window = min(c.window_size, res)
        if res % window:
            raise ValueError(
                f"img_size {c.img_size}: stage {i}'s {res}x{res} map is not divisible into "
                f"{window}x{window} windows"
            )
        shift = window // 2 if res > c.window_size else 0
        out.append(StageGeometry(res, c.dim * 2**i, window, shift))
    return tuple(out)


def relative_position_index(window: int) -> np.ndarray:
    """(N, N) with N = window^2: the row of the bias table for query i and key j, from their
    offset (dy, dx) in [-(M-1), M-1]^2: ``(dy + M - 1) * (2M - 1) + dx + M - 1``."""
    y, x = np.divmod(np.arange(window * window), window)
    dy = y[:, None] - y[None, :] + window - 1
    dx = x[:, None] - x[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_partition(x, window: int):
    """(B, H, W, C) -> (B * H/M * W/M, M*M, C); windows and tokens in row-major order (a
    tensor or a numpy array)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    x = x.permute(0, 1, 3, 2, 4, 5) if isinstance(x, Tensor) else x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(x: Tensor, window: int, h: int, w: int) -> Tensor:
    """The inverse of ``window_partition``: (B * nW, M*M, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
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
    shifts = np.array([g.shift if i % 2 else 0 for i in range(depth)], np.int64)
    zero = shift_mask(g.resolution, g.window, 0)
    shifted = shift_mask(g.resolution, g.window, g.shift)
    masks = np.stack([shifted if s else zero for s in shifts])
    shifts.setflags(write=False)
    masks.setflags(write=False)
    return shifts, masks


def drop_path_rates(c: SwinConfig) -> list[np.ndarray]:
    """Swin's stochastic-depth rule: rates linear from 0 to ``drop_path_rate`` over all
    layers, split per stage (float32, as in revjax)."""
    rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths)).astype(np.float32)
    return np.split(rates, np.cumsum(c.depths)[:-1])


# --- layers -------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a fused ``qkv``, an output ``proj`` and
    a learned relative position bias ``relative_position_bias_table`` ((2M-1)^2, heads); the
    index into it is a non-persistent buffer (a constant, not in the state dict)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.window = heads, window
        self.qkv = layers.dense(dim, 3 * dim)
        self.proj = layers.dense(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            layers.init_w(torch.empty((2 * window - 1) ** 2, heads))
        )
        index = torch.as_tensor(relative_position_index(window), dtype=torch.int64)
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (batch * nW, M*M, dim), windows in row-major order per image; mask: optional
        (nW, M*M, M*M) additive bias (``shift_mask``)."""
        b, n, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, h, n, d)
        logits = q @ k.transpose(-2, -1)  # (b, h, q, k)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * d**-0.5
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        logits = logits + bias.reshape(n, n, self.heads).permute(2, 0, 1).to(logits.dtype)
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(b // nw, nw, self.heads, n, n) + mask[None, :, None].to(
                logits.dtype
            )
            logits = logits.reshape(b, self.heads, n, n)
        attn = torch.softmax(logits, dim=-1).to(v.dtype)  # softmax in float32 (or wider)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class WindowAttentionHalf(nn.Module):
    """F = LayerNorm + (shifted) window attention, on a (batch, H, W, C) map.

    Per-layer inputs: ``shift`` (an int or a 0-d CPU tensor: the map is rolled by ``-shift``
    before the window partition and back after), ``mask`` (``shift_mask`` for that shift), and
    for training ``key`` and ``drop_path`` (this layer's rate).
    """

    def __init__(self, dim: int, heads: int, window: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = layers.layer_norm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.window, self.drop_rate = window, drop_rate

    def forward(self, x, *_, shift=0, mask=None, key=None, drop_path=None, **__) -> Tensor:
        _, h, w, _ = x.shape
        s = int(shift)
        y = self.norm(x)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, self.window), mask), self.window, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        return layers.branch_dropout(y, self.drop_rate, drop_path, key, 0)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (offsets (0,0), (1,0), (0,1), (1,1) in (y, x), Swin's
    order) -> LayerNorm(4 * in) -> ``reduction`` Linear(4 * in, out), no bias."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = layers.layer_norm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)
        layers.init_w(self.reduction.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5)  # (.., dx, dy, c)
        return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class PatchEmbed(layers.PatchEmbed):
    """Swin's patch embedding: the shared ``PatchEmbed`` then LayerNorm, as a channels-last
    (batch, H/p, W/p, C) map."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__(img_size, patch_size, in_chans, dim)
        self.norm = layers.layer_norm(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = super().forward(x)
        side = self.img_size // self.patch_size
        return self.norm(tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1]))


# --- model --------------------------------------------------------------------------------


class SwinTransformer(nn.Module):
    """Swin whose stages are ``RevStack`` s (``config.reversible``) or residual blocks.

    Parameter paths: ``patch_embed.{proj,norm}``, ``stages.<i>.blocks.{f,g}.<layer>``,
    ``stages.<i>.fusion`` and ``stages.<i>.transition.{norm,reduction}`` for i >= 1, ``norm``,
    ``head``. Dropout and drop-path are on in training mode: each call then draws one int64
    key per layer from torch's default generator (per-layer inputs, replayed exactly by
    reprop/pareprop).
    """

    def __init__(self, config: SwinConfig, *, mode: str | None = None) -> None:
        super().__init__()
        c = config
        check_dtypes(c)
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.geometry = geo = geometry(config)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim)
        stages = []
        for i, (g, depth, heads) in enumerate(zip(geo, c.depths, c.heads)):
            make_f = functools.partial(WindowAttentionHalf, g.dim, heads, g.window,
                                       drop_rate=c.drop_rate)
            make_g = functools.partial(layers.MlpHalf, g.dim, int(g.dim * c.mlp_ratio),
                                       drop_rate=c.drop_rate)
            merge = functools.partial(PatchMerging, out_dim=g.dim) if i else None
            stages.append(Stage(make_f, make_g, depth=depth, reversible=c.reversible,
                                mode=self.mode, make_transition=merge,
                                in_dim=geo[i - 1].dim if i else None, fusion=c.fusion,
                                stack_options=numerics))
            _, masks = stage_inputs(g, depth)
            self.register_buffer(f"stage{i}_mask", torch.tensor(masks), persistent=False)
        self.stages = nn.ModuleList(stages)
        width = 2 * geo[-1].dim if c.reversible else geo[-1].dim
        self.norm = layers.layer_norm(width)
        self.head = layers.dense(width, c.num_classes)
        self.to(c.param_dtype)

    def _compute(self, x: Tensor) -> contextlib.AbstractContextManager:
        """Autocast to ``config.dtype`` when it is below the parameters' dtype, else nothing."""
        return compute_context(self.config, self.head.weight.dtype, x.device)

    def per_layer(self, i: int, train: bool = False) -> dict[str, Tensor]:
        """Stage i's per-layer inputs: ``shift`` (CPU), ``mask`` and, when ``train`` and a rate
        is non-zero, dropout ``key`` s and the ``drop_path`` rates (CPU)."""
        c = self.config
        shifts, _ = stage_inputs(self.geometry[i], c.depths[i])
        out = {"shift": torch.tensor(shifts), "mask": getattr(self, f"stage{i}_mask")}
        if train and (c.drop_rate > 0 or c.drop_path_rate > 0):
            out.update(layers.layer_keys(c.depths[i]))
            if c.drop_path_rate > 0:
                out["drop_path"] = torch.tensor(drop_path_rates(c)[i])
        return out

    def features(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Normalised, pooled features: (batch, 2 * C_last) for Rev-Swin, (batch, C_last)."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        with self._compute(x):
            streams = start(self.patch_embed(x), c.reversible)
            for i, stage in enumerate(self.stages):
                streams = stage(streams, per_layer=self.per_layer(i, self.training),
                                mode=mode if c.reversible else None)
            return self.norm(concat(streams)).mean(dim=(1, 2))

    def forward(self, x: Tensor, *, mode: str | None = None) -> Tensor:
        """Logits for NCHW images ``x`` of shape (batch, in_chans, img_size, img_size).

        ``mode`` overrides the backward mode for this call (standard twins: backprop only).
        """
        with self._compute(x):
            return self.head(self.features(x, mode=mode))


register_family("swin", SwinConfig, SwinTransformer, VARIANTS)
