"""Layers shared by every model: dense, LayerNorm, attention, MLP, patch embedding, the
reversible halves F and G, dropout and drop-path with explicit generators (the twin of
``revjax/layers.py``, module for module and attribute for attribute).

Numerics follow docs/conventions.md: exact GELU, LayerNorm epsilon 1e-6, softmax in (at least)
float32, truncated-normal(0.02, cut at two standard deviations) dense/conv/embedding weights
with zero biases (as timm's ViT and ``jax.nn.initializers.truncated_normal``).

Randomness inside F and G (dropout, drop-path) never comes from torch's global generator:
reprop/pareprop call F and G again in the backward, so each layer gets an int64 ``key`` as a
per-layer input and derives its own ``torch.Generator`` from it; the rebuild draws the same
masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LN_EPS = 1e-6
INIT_STD = 0.02


def init_w(weight: Tensor) -> Tensor:
    """In place: truncated normal, std 0.02, cut at +-2 std (``truncated_normal(0.02)``)."""
    return nn.init.trunc_normal_(weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)


def dense(din: int, dout: int) -> nn.Linear:
    """A dense layer with timm's ViT initialisation."""
    layer = nn.Linear(din, dout)
    init_w(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm over the last axis, epsilon 1e-6, scale 1 and bias 0."""
    return nn.LayerNorm(dim, eps=LN_EPS)


def dropout(x: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout drawing from ``generator``; identity when it is None or rate is 0."""
    if generator is None or rate == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) < 1.0 - rate
    return torch.where(keep, x / (1.0 - rate), 0).to(x.dtype)


def drop_path(x: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample (axis 0)."""
    if generator is None or rate == 0.0:
        return x
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = torch.rand(shape, generator=generator, device=x.device) < 1.0 - rate
    return torch.where(keep, x / (1.0 - rate), 0).to(x.dtype)


def _mix(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit seed from a small integer."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def generator_for(key: Tensor | int, which: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from a layer's ``key`` and ``which`` (0 for F, 1 for
    G), so the two halves of a layer draw independent masks from the layer's one key."""
    return torch.Generator(device=device).manual_seed(_mix(2 * int(key) + which))


def _regularise(x: Tensor, drop_rate: float, drop_path_rate: float, key, which: int) -> Tensor:
    """Dropout then drop-path on a branch output; identity without a key."""
    if key is None or (drop_rate == 0.0 and drop_path_rate == 0.0):
        return x
    gen = generator_for(key, which, x.device)
    return drop_path(dropout(x, drop_rate, gen), drop_path_rate, gen)


def layer_keys(depth: int) -> dict[str, Tensor]:
    """Per-layer dropout keys for a stack (``per_layer`` input): ``depth`` int64 seeds drawn
    from torch's default generator, so ``torch.manual_seed`` makes a step reproducible."""
    return {"key": torch.randint(0, 2**62, (depth,), dtype=torch.int64)}


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = dense(dim, 3 * dim)
        self.proj = dense(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (batch, tokens, dim); mask: optional (batch, tokens) with 1 for tokens to attend."""
        b, n, c = x.shape
        d = c // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, h, n, d)
        logits = q @ k.transpose(-2, -1)  # (b, h, q, k)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * d**-0.5
        if mask is not None:
            keep = mask[:, None, None, :] > 0
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        attn = torch.softmax(logits, dim=-1).to(v.dtype)  # softmax in float32 (or wider)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = dense(dim, hidden)
        self.fc2 = dense(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="none"))


class AttentionHalf(nn.Module):
    """F = LayerNorm + self-attention (+ dropout, drop-path with per-layer keys)."""

    def __init__(
        self, dim: int, heads: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.attn = Attention(dim, heads)
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate

    def forward(self, x: Tensor, mask: Tensor | None = None, *, key=None, **_) -> Tensor:
        out = self.attn(self.norm(x), mask)
        return _regularise(out, self.drop_rate, self.drop_path_rate, key, 0)


class MlpHalf(nn.Module):
    """G = LayerNorm + MLP (+ dropout, drop-path with per-layer keys)."""

    def __init__(
        self, dim: int, hidden: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.norm = layer_norm(dim)
        self.mlp = Mlp(dim, hidden)
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate

    def forward(self, x: Tensor, *_, key=None, drop_path=None, **__) -> Tensor:
        """``drop_path``: this layer's rate as a per-layer input (Swin's and MViT's schedule
        over depth), replacing the fixed ``drop_path_rate``."""
        out = self.mlp(self.norm(x))
        if drop_path is not None:
            return branch_dropout(out, self.drop_rate, drop_path, key, 1)
        return _regularise(out, self.drop_rate, self.drop_path_rate, key, 1)


class PatchEmbed(nn.Module):
    """Patches (a convolution of stride ``patch_size``), flattened to (batch, tokens, dim).

    By default the patches do not overlap (kernel = stride, no padding); MViT's overlapping
    embedding passes ``kernel_size=7, padding=3``. Either way the map is img_size / patch_size
    on a side. Input NCHW ``(batch, in_chans, img_size, img_size)``; tokens in row-major (h, w)
    order, as the NHWC reshape of the JAX twin. Outside autocast the images are cast to the
    parameters' dtype.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, *,
                 kernel_size: int | None = None, padding: int = 0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        kernel = patch_size if kernel_size is None else kernel_size
        if (img_size + 2 * padding - kernel) // patch_size + 1 != img_size // patch_size:
            raise ValueError(
                f"a {kernel}x{kernel} patch kernel with padding {padding} and stride "
                f"{patch_size} does not give a {img_size // patch_size}-wide map from "
                f"{img_size} px"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=patch_size, padding=padding)
        init_w(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def forward(self, x: Tensor) -> Tensor:
        want = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"expected images of shape (batch, {want[0]}, {want[1]}, {want[2]}) (NCHW), "
                f"got {got}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.proj.weight.dtype)
        return self.proj(x).flatten(2).transpose(1, 2)


def branch_dropout(x: Tensor, drop_rate: float, drop_path_rate, key, which: int) -> Tensor:
    """Dropout then drop-path on a branch output, as ``AttentionHalf``/``MlpHalf`` do, but
    with the drop-path rate given per call: a float, a 0-d tensor (a per-layer input of a
    stack, e.g. Swin's linearly increasing stochastic depth; keep it on the CPU, reading it
    is then free) or None (no drop-path). Identity without a key; ``which`` tells F (0) from
    G (1)."""
    rate = 0.0 if drop_path_rate is None else float(drop_path_rate)
    return _regularise(x, drop_rate, rate, key, which)
