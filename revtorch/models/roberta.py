"""Rev-RoBERTa and its standard RoBERTa twin (Liu et al., "RoBERTa: A Robustly Optimized BERT
Pretraining Approach", 2019), masked-language models over token ids (the twin of
``revjax/models/roberta.py``: same config fields, variants, module names and counts).

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
in every mode. Their own outputs are meaningless; ``revtorch.mlm`` ignores them.

Dtypes as ``revtorch.models.vit``: ``param_dtype`` by building in float32 and casting; a
lower compute ``dtype`` (bfloat16, float16) runs under ``torch.autocast`` with the two streams
cast to it after the embedding LayerNorm.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor, nn

from .. import layers, mlm
from ..stack import ResidualStack, RevStack
from .registry import register_family
from .config import check_dtypes, compute_context, resolve_mode, stack_options


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
    dtype: torch.dtype | None = None  # compute dtype (None: the parameters')
    param_dtype: torch.dtype = torch.float32
    stream_dtype: str | torch.dtype | None = None  # residual streams' dtype; reversible
    anchor_every: int | None = None  # store the exact streams every k layers; reversible


# (dim, depth, heads): RoBERTa-base/large (Liu et al., 2019; the BERT-base/large shapes of
# Devlin et al., 2019, Table 1), byte-level BPE vocabulary of 50265 tokens, 512 positions.
VARIANTS = {
    "base": dict(dim=768, depth=12, heads=12),
    "large": dict(dim=1024, depth=24, heads=16),
    "test": dict(dim=32, depth=2, heads=2, vocab_size=100, max_len=16),
}


def position_ids(mask: Tensor) -> Tensor:
    """RoBERTa's positions from a (batch, length) padding mask (nonzero = real token):
    ``cumsum(mask) * mask + 1``; real tokens count from 2, padding sits at 1."""
    m = mask.to(torch.int64)
    return torch.cumsum(m, dim=1) * m + POS_PAD


class MlmHead(nn.Module):
    """dense(C, C) -> exact GELU -> LayerNorm -> decoder tied to the token embedding + bias."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = layers.dense(dim, dim)
        self.norm = layers.layer_norm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, embed: nn.Embedding) -> Tensor:
        h = self.norm(nn.functional.gelu(self.dense(x), approximate="none"))
        return nn.functional.linear(h, embed.weight, self.bias)


class Roberta(nn.Module):
    """A RoBERTa MLM whose encoder is a ``RevStack`` (``config.reversible``) or residual blocks.

    Dropout and drop-path (``drop_rate``, ``drop_path_rate``, inside F and G) are on in
    training mode, with one int64 key per layer drawn from torch's default generator, as in
    ``revtorch.models.vit``.
    """

    def __init__(self, config: RobertaConfig, *, mode: str | None = None) -> None:
        super().__init__()
        c = config
        check_dtypes(c)
        if c.max_len < 1 or c.vocab_size < 1:
            raise ValueError(
                f"max_len and vocab_size must be positive, got {c.max_len}, {c.vocab_size}"
            )
        if not 0 <= c.pad_id < c.vocab_size:
            raise ValueError(f"pad_id {c.pad_id} is outside the vocabulary [0, {c.vocab_size})")
        self.config = config
        self.mode = resolve_mode(config, mode)
        numerics = stack_options(config)
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.max_len + POS_PAD + 1, c.dim)
        layers.init_w(self.tok_embed.weight)
        layers.init_w(self.pos_embed.weight)
        self.embed_norm = layers.layer_norm(c.dim)
        reg = dict(drop_rate=c.drop_rate, drop_path_rate=c.drop_path_rate)
        make_f = lambda: layers.AttentionHalf(c.dim, c.heads, **reg)  # noqa: E731
        make_g = lambda: layers.MlpHalf(c.dim, int(c.dim * c.mlp_ratio), **reg)  # noqa: E731
        if c.reversible:
            self.blocks = RevStack(make_f, make_g, depth=c.depth, mode=self.mode, **numerics)
        else:
            self.blocks = ResidualStack(make_f, make_g, depth=c.depth)
        self.norm = layers.layer_norm(c.dim)
        self.head = MlmHead(c.dim, c.vocab_size)
        self.to(c.param_dtype)

    def _compute(self, ids: Tensor) -> contextlib.AbstractContextManager:
        """Autocast to ``config.dtype`` when it is below the parameters' dtype, else nothing."""
        return compute_context(self.config, self.tok_embed.weight.dtype, ids.device)

    def _inputs(self, ids, mask) -> tuple[Tensor, Tensor]:
        """Checked ids and a boolean padding mask (derived from ``pad_id`` when None)."""
        c = self.config
        if not isinstance(ids, Tensor):
            raise TypeError(f"expected a tensor of token ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"expected integer token ids, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, length), got {tuple(ids.shape)}")
        if ids.shape[1] > c.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {c.max_len}")
        # A host-side range check only on CPU: on accelerators it would synchronise every
        # call (the embedding's own device-side check still fires there).
        if ids.device.type == "cpu" and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {c.vocab_size}), got values in [{lo}, {hi}]"
                )
        if mask is None:
            return ids, ids != c.pad_id
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a tensor of the ids' shape {tuple(ids.shape)}, got {got}"
            )
        return ids, mask if mask.dtype == torch.bool else mask > 0

    def features(self, ids: Tensor, mask: Tensor | None = None, *, mode: str | None = None
                 ) -> Tensor:
        """Normalised encoder output (batch, length, C); for Rev-RoBERTa the average of the
        two streams."""
        c = self.config
        mode = resolve_mode(c, mode or self.mode)
        ids, mask = self._inputs(ids, mask)
        with self._compute(ids):
            h = self.embed_norm(self.tok_embed(ids) + self.pos_embed(position_ids(mask)))
            if torch.is_autocast_enabled(ids.device.type):
                h = h.to(c.dtype)
            train = self.training and (c.drop_rate > 0 or c.drop_path_rate > 0)
            keys = layers.layer_keys(c.depth) if train else {}
            if c.reversible:
                y1, y2 = self.blocks(h, h, mask, per_layer=keys, mode=mode)
                h = (y1 + y2) / 2
            else:
                h = self.blocks(h, mask, per_layer=keys)
            return self.norm(h)

    def forward(self, ids: Tensor, mask: Tensor | None = None, *, mode: str | None = None,
                labels: Tensor | None = None) -> Tensor:
        """MLM logits (batch, length, vocab_size) for token ids (batch, length).

        ``mask`` (batch, length), nonzero for real tokens, defaults to ``ids != pad_id``; it
        is not differentiated. ``mode`` overrides the backward mode for this call (standard
        twins: backprop only). With ``labels``, the MLM loss instead (``loss``: without the
        full logits), through ``forward`` so that DDP and FSDP wrappers see the call.
        """
        if labels is not None:
            return self.loss(ids, labels, mask, mode=mode)
        h = self.features(ids, mask, mode=mode)
        with self._compute(ids):
            return self.head(h, self.tok_embed)

    def loss(self, ids: Tensor, labels: Tensor, mask: Tensor | None = None, *,
             mode: str | None = None, chunk: int = mlm.HEAD_CHUNK) -> Tensor:
        """The MLM loss, ``mlm_loss(self(ids, mask), labels)``, without the full logits: the
        head runs on the predicted positions only, ``chunk`` per row at a time, and its
        logits are recomputed in the backward (``revtorch.mlm.head_loss``). The training
        steps use it; ``forward`` still gives every position's logits."""
        if tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(f"labels {tuple(labels.shape)} do not match ids "
                             f"{tuple(ids.shape)}")
        h = self.features(ids, mask, mode=mode)
        with self._compute(ids):
            return mlm.head_loss(lambda x: self.head(x, self.tok_embed), h, labels,
                                 chunk=chunk)


register_family("roberta", RobertaConfig, Roberta, VARIANTS)
