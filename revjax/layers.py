"""Layers shared by every model: dense, LayerNorm, attention, MLP, patch embedding, the
reversible halves F and G, dropout and drop-path with explicit keys, the residual twin.

Numerics follow docs/conventions.md: exact GELU, LayerNorm epsilon 1e-6, softmax in float32,
truncated-normal(0.02) dense/embedding weights with zero biases (as timm's ViT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-6
init_w = nnx.initializers.truncated_normal(stddev=0.02)


def dense(din: int, dout: int, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    """A dense layer with timm's ViT initialisation."""
    return nnx.Linear(din, dout, kernel_init=init_w, bias_init=nnx.initializers.zeros_init(),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def layer_norm(dim: int, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when ``key`` is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: drop the whole residual branch per sample (axis 0), explicit key."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = dense(dim, 3 * dim, rngs, dtype, param_dtype)
        self.proj = dense(dim, dim, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (batch, tokens, dim); mask: optional (batch, tokens) with 1 for tokens to attend."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, d)
        acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 (or wider) logits and softmax
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
        logits = logits * (c // self.heads) ** -0.5
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(acc).min)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax in float32
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return self.proj(out)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.fc1 = dense(dim, hidden, rngs, dtype, param_dtype)
        self.fc2 = dense(hidden, dim, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class AttentionHalf(nnx.Module):
    """F = LayerNorm + self-attention (+ dropout, drop-path with per-layer keys)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dtype=None, param_dtype=jnp.float32):
        self.norm = layer_norm(dim, rngs, dtype, param_dtype)
        self.attn = Attention(dim, heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate

    def __call__(self, x, mask=None, *, key=None, **_):
        out = self.attn(self.norm(x), mask)
        return _regularise(out, self.drop_rate, self.drop_path_rate, key, 0)


class MlpHalf(nnx.Module):
    """G = LayerNorm + MLP (+ dropout, drop-path with per-layer keys)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dtype=None, param_dtype=jnp.float32):
        self.norm = layer_norm(dim, rngs, dtype, param_dtype)
        self.mlp = Mlp(dim, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate

    def __call__(self, x, *_, key=None, drop_path=None, **__):
        """``drop_path``: this layer's rate as a per-layer input (Swin's and MViT's schedule
        over depth), replacing the fixed ``drop_path_rate``."""
        out = self.mlp(self.norm(x))
        if drop_path is not None:
            return branch_dropout(out, self.drop_rate, drop_path, key, 1)
        return _regularise(out, self.drop_rate, self.drop_path_rate, key, 1)


def _regularise(x, drop_rate, drop_path_rate, key, which: int):
    """Dropout then drop-path on a branch output; ``which`` tells F (0) from G (1) so the
    two halves of a layer draw independent masks from the layer's one key."""
    if key is None:
        return x
    k_drop, k_path = jax.random.split(jax.random.fold_in(key, which))
    return drop_path(dropout(x, drop_rate, k_drop), drop_path_rate, k_path)


def layer_keys(rngs: nnx.Rngs | None, depth: int) -> dict:
    """Per-layer dropout keys for a stack (``per_layer`` input), or none without ``rngs``."""
    if rngs is None:
        return {}
    return {"key": jax.random.split(rngs.dropout(), depth)}


class PatchEmbed(nnx.Module):
    """Patches (a convolution of stride ``patch_size``), flattened to (batch, tokens, dim).

    By default the patches do not overlap (kernel = stride, no padding); MViT's overlapping
    embedding passes ``kernel_size=7, padding=3``. Either way the map is img_size / patch_size
    on a side.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, *,
                 rngs: nnx.Rngs, kernel_size: int | None = None, padding: int = 0,
                 dtype=None, param_dtype=jnp.float32):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        kernel = patch_size if kernel_size is None else kernel_size
        if (img_size + 2 * padding - kernel) // patch_size + 1 != img_size // patch_size:
            raise ValueError(f"a {kernel}x{kernel} patch kernel with padding {padding} and "
                             f"stride {patch_size} does not give a {img_size // patch_size}"
                             f"-wide map from {img_size} px")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.proj = nnx.Conv(in_chans, dim, (kernel, kernel), strides=patch_size,
                             padding=((padding, padding),) * 2, kernel_init=init_w,
                             bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def __call__(self, x: jax.Array) -> jax.Array:
        want = (self.img_size, self.img_size, self.in_chans)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected images of shape (batch, {want[0]}, {want[1]}, "
                             f"{want[2]}) (NHWC), got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"expected floating-point images, got {x.dtype}")
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def branch_dropout(x: jax.Array, drop_rate: float, drop_path_rate, key: jax.Array | None,
                   which: int) -> jax.Array:
    """Dropout then drop-path on a branch output, as ``AttentionHalf``/``MlpHalf`` do, but
    with the drop-path rate given per call: a float, an array (a per-layer input of a stack,
    e.g. Swin's linearly increasing stochastic depth, traced inside the scan) or None (no
    drop-path). Identity without a key; ``which`` tells F (0) from G (1)."""
    if key is None:
        return x
    k_drop, k_path = jax.random.split(jax.random.fold_in(key, which))
    x = dropout(x, drop_rate, k_drop)
    if drop_path_rate is None:
        return x
    keep_prob = 1.0 - jnp.asarray(drop_path_rate, jnp.float32)
    keep = jax.random.bernoulli(k_path, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob.astype(x.dtype), 0).astype(x.dtype)
