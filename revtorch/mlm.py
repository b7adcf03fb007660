"""Masked-language modelling (Devlin et al., 2019; RoBERTa's dynamic masking, Liu et al., 2019):
token masking, the loss over the masked positions, and a training step for any MLM model of
``revtorch.models`` (called ``model(ids, mask, *, mode)`` -> logits). The twin of
``revjax/mlm.py``.

Labels use ``IGNORE`` (-100, ``cross_entropy``'s default ``ignore_index``) at the positions
that are not predicted.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def mask_tokens(
    ids: Tensor,
    generator: torch.Generator | None = None,
    *,
    mask_id: int,
    vocab_size: int,
    pad_id: int | None = None,
    special_mask: Tensor | None = None,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: select each eligible token with probability ``prob``; of those, 80%
    become ``mask_id``, 10% a token drawn uniformly from ``[0, vocab_size)``, 10% stay.

    Args:
      ids: integer token ids, any shape (usually (batch, length)).
      generator: the ``torch.Generator`` to draw from (on ``ids``' device); None uses torch's
        default generator. The result is a function of the generator's state.
      mask_id, vocab_size: the mask token and the vocabulary size (for random tokens).
      pad_id: the padding id; padding is never selected.
      special_mask: optional boolean tensor of ``ids``' shape, True where a token must never
        be selected (``<s>``, ``</s>``, padding...). At least one of ``pad_id`` and
        ``special_mask`` is required, so that padding cannot be selected by accident.
      prob: selection probability.

    Returns:
      ``(inputs, labels)``: ``inputs`` the corrupted ids; ``labels`` the original id at the
      selected positions and ``IGNORE`` elsewhere (both of ``ids``' dtype). Random
      replacements never draw ``pad_id`` (when given), so the padding mask a model derives
      from ``inputs`` (``inputs != pad_id``) is the one of ``ids``.
    """
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"expected integer token ids, got {got}")
    if pad_id is None and special_mask is None:
        raise ValueError("pass pad_id and/or special_mask, so that padding is never selected")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if pad_id is not None and mask_id == pad_id:
        raise ValueError(f"mask_id and pad_id must differ, both are {mask_id}")
    eligible = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if pad_id is not None:
        eligible &= ids != pad_id
    if special_mask is not None:
        if special_mask.shape != ids.shape:
            raise ValueError(
                f"special_mask must have the ids' shape {tuple(ids.shape)}, "
                f"got {tuple(special_mask.shape)}"
            )
        eligible &= ~special_mask.to(torch.bool)
    kw = dict(generator=generator, device=ids.device)
    selected = eligible & (torch.rand(ids.shape, **kw) < prob)
    how = torch.rand(ids.shape, **kw)
    if pad_id is None:
        random_tokens = torch.randint(0, vocab_size, ids.shape, dtype=ids.dtype, **kw)
    else:  # uniform over the vocabulary without pad_id
        random_tokens = torch.randint(0, vocab_size - 1, ids.shape, dtype=ids.dtype, **kw)
        random_tokens = random_tokens + (random_tokens >= pad_id).to(ids.dtype)
    inputs = torch.where(selected & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy over the positions whose label is not ``IGNORE``, in
    float32 (or wider); 0 when there are none. logits (..., vocab), labels (...)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
        ignore_index=IGNORE, reduction="none",
    )
    return losses.sum() / (labels != IGNORE).sum().clamp(min=1)


HEAD_CHUNK = 32  # positions per row that the head's logits are computed for at a time


def head_loss(head: Callable[[Tensor], Tensor], features: Tensor, labels: Tensor, *,
              chunk: int = HEAD_CHUNK) -> Tensor:
    """``mlm_loss(head(features), labels)`` without the (batch, length, vocab) logits (the
    twin of ``revjax.mlm.head_loss``).

    Only the predicted positions (labels not ``IGNORE``) enter the head, ``chunk`` per row
    (``chunk * batch`` positions) at a time, each piece under a non-reentrant checkpoint: its
    logits are recomputed in the backward, never stored. The peak holds one piece's logits.

    Args:
      head: ``head(x) -> logits`` for x (n, C).
      features: (batch, length, C); labels: (batch, length), ``IGNORE`` where not predicted.
      chunk: positions per row per piece (>= 1).
    """
    if features.dim() != 3 or tuple(labels.shape) != tuple(features.shape[:2]):
        raise ValueError(f"features (batch, length, C) {tuple(features.shape)} do not match "
                         f"labels {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    valid = labels != IGNORE
    x, y = features[valid], labels[valid].long()  # row-major: each row's positions in order
    piece = chunk * features.shape[0]
    dtype = torch.promote_types(features.dtype, torch.float32)
    total = features.new_zeros((), dtype=dtype)

    def piece_sum(x, y):
        logits = head(x).to(dtype)
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    for s in range(0, x.shape[0], piece):
        total = total + checkpoint(piece_sum, x[s:s + piece], y[s:s + piece],
                                   use_reentrant=False)
    return total / valid.sum().clamp(min=1)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    mode: str | None = None,
) -> float:
    """One optimizer step on a masked batch (``inputs, labels = mask_tokens(...)``); returns
    the loss. ``mask`` is the padding mask (None: derived from the model's ``pad_id``).
    Gradients are cleared first."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(ids, mask, mode=mode, labels=labels)
    loss.backward()
    optimizer.step()
    return loss.item()
