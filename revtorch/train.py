"""A classification training step for any ``revtorch.models`` model (the twin of
``revjax/train.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy over the batch, computed in float32 (or wider)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return nn.functional.cross_entropy(logits.to(dtype), labels)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    mode: str | None = None,
) -> float:
    """One optimizer step on a batch; returns the loss. ``mode`` picks the backward.

    Gradients are cleared first, so they need not be before the call. Dropout follows the
    model's training flag (``model.train()``) and torch's default generator.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = cross_entropy_loss(model(images, mode=mode), labels)
    loss.backward()
    optimizer.step()
    return loss.item()
