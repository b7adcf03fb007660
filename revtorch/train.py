"""Training pieces for ``revtorch.models`` (the twin of ``revjax/train.py``).

- ``make_optimizer``: AdamW (weight decay on matrices only, ndim >= 2) and a ``LambdaLR``
  with linear warm-up from 0 and cosine decay to 0: the learning rates of
  ``revjax.train.make_optimizer`` (optax's ``warmup_cosine_decay_schedule``) step for step.
- ``scheduled_train_step``: one step for ``task`` ``"classification"`` (images, labels) or
  ``"mlm"`` (inputs, labels, padding mask; ``revtorch.mlm``), with global-norm clipping,
  the scheduler's step and, for float16, a ``torch.amp.GradScaler``; ``eval_step``: the
  sums of an evaluation batch (as ``revjax.train.make_eval_step``).
- ``train_step(model, optimizer, images, labels, *, mode=None)``: the one-call
  classification step of the README's quick start (no clipping, no scheduler).

Mixed precision: build the model with ``dtype=torch.bfloat16`` (or ``torch.float16``) and
float32 parameters; the model runs its forward under ``torch.autocast`` itself and the losses
are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


TASKS = ("classification", "mlm")


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy over the batch, computed in float32 (or wider)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return nn.functional.cross_entropy(logits.to(dtype), labels)


# ----------------------------------------------------------------------- optimizer


def _warmup(total_steps: int, warmup_steps: int | None) -> int:
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = max(1, total_steps // 10) if warmup_steps is None else warmup_steps
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup}")
    return warmup


def lr_factor(step: int, total_steps: int, warmup_steps: int | None = None) -> float:
    """The learning rate at ``step`` as a fraction of the peak: ``step / warmup`` during the
    warm-up, then ``0.5 (1 + cos(pi t))`` with ``t`` the fraction of the decay done (clamped
    to 1: 0 from ``total_steps`` on). optax's ``warmup_cosine_decay_schedule(0, 1, warmup,
    total_steps, 0)``."""
    warmup = _warmup(total_steps, warmup_steps)
    if step < warmup:
        return step / warmup
    t = min(step - warmup, total_steps - warmup) / (total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def learning_rate(step: int, learning_rate: float, total_steps: int,
                  warmup_steps: int | None = None) -> float:
    """The learning rate ``make_optimizer`` uses at a step (for logging)."""
    return learning_rate * lr_factor(step, total_steps, warmup_steps)


def make_optimizer(model: nn.Module, learning_rate: float, total_steps: int,
                   warmup_steps: int | None = None, weight_decay: float = 0.05,
                   clip_norm: float | None = 1.0, *, b1: float = 0.9, b2: float = 0.999,
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)``: AdamW over the model's trainable parameters, weight decay
    on those with ndim >= 2 only (not biases, norm scales), and a ``LambdaLR`` rising
    linearly from 0 over ``warmup_steps`` (default 10% of ``total_steps``) to
    ``learning_rate`` and decaying by a cosine to 0 at ``total_steps``. Call
    ``scheduler.step()`` after each ``optimizer.step()`` (``scheduled_train_step`` does).
    ``clip_norm`` is checked here and applied by ``scheduled_train_step``."""
    warmup = _warmup(total_steps, warmup_steps)
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(b1, b2), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup))
    return optimizer, scheduler


# ------------------------------------------------------------------------- steps


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def compute_loss(model: nn.Module, batch: tuple, *, task: str, mode: str | None) -> Tensor:
    """The task's loss on a batch: classification ``(images, labels)`` -> mean cross-entropy;
    mlm ``(inputs, labels, mask)`` -> ``model(..., labels=labels)`` (``revtorch.mlm.head_loss``:
    the loss without the full logits; mask: padding, may be None)."""
    _check_task(task)
    if task == "classification":
        images, labels = batch
        return cross_entropy_loss(model(images, mode=mode), labels)
    inputs, labels, mask = batch
    return model(inputs, mask, mode=mode, labels=labels)


def scheduled_train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler | None, batch: tuple,
                         *, task: str = "classification", mode: str | None = None,
                         scaler: torch.amp.GradScaler | None = None,
                         clip_norm: float | None = 1.0, loss_weight: float = 1.0) -> dict:
    """One optimizer step; returns ``{"loss", "grad_norm", "lr"}`` (floats: the loss times
    ``loss_weight``, the global gradient norm before clipping, the learning rate the step
    used).

    Gradients are cleared first, then clipped to global norm ``clip_norm`` (None: not
    clipped) as optax's ``clip_by_global_norm`` does: scaled by ``clip_norm / norm`` when
    the norm exceeds it (``clip_grad_norm_`` divides by ``norm + 1e-6``, a 3e-7 relative
    difference at norm 3, which breaks float64 agreement with revjax); ``scheduler`` (may
    be None) steps after the optimizer. With a ``GradScaler`` (float16 compute) the loss is
    scaled, the gradients unscaled before clipping, and a step with non-finite gradients is
    skipped by the scaler (its ``grad_norm`` is then inf or nan). Dropout follows ``model.train()``.

    ``model`` may be wrapped in ``DistributedDataParallel`` or sharded with FSDP2's
    ``fully_shard`` (the gradient norm is then the global one). ``loss_weight`` multiplies
    the loss before the backward: under DDP, which averages the ranks' gradients, a rank
    whose share of the global batch's loss terms is not ``1 / world`` (MLM: predicted tokens)
    passes ``world * local_terms / global_terms`` so that the step is the global batch's.
    """
    _check_task(task)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(model, batch, task=task, mode=mode)
    if loss_weight != 1.0:
        loss = loss * loss_weight
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2 parameters)
        norm = norm.full_tensor()
    grad_norm = float(norm)
    if clip_norm is not None and grad_norm > clip_norm:  # optax's clip_by_global_norm
        for g in grads:
            g.mul_(clip_norm / grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    return {"loss": loss.item(), "grad_norm": grad_norm, "lr": float(lr)}


@torch.no_grad()
def eval_step(model: nn.Module, batch: tuple, weights: Tensor, *,
              task: str = "classification", mode: str | None = None) -> dict:
    """The sums of an evaluation batch (no gradients; the model in eval mode for the call).
    ``weights`` (batch,) is 1 for real examples, 0 for padding. Classification:
    ``{"loss_sum", "correct", "count"}``; mlm: ``{"loss_sum", "count"}`` over the predicted
    tokens of the rows with weight 1. Floats, so that batches add up."""
    _check_task(task)
    was_training = model.training
    model.eval()
    try:
        if task == "classification":
            images, labels = batch
            logits = model(images, mode=mode)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            w = weights.to(logits.dtype)
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
            correct = (logits.argmax(-1) == labels).to(w.dtype)
            return {"loss_sum": float((losses * w).sum()), "correct": float((correct * w).sum()),
                    "count": float(w.sum())}
        inputs, labels, mask = batch
        logits = model(inputs, mask, mode=mode)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        valid = (labels >= 0) & (weights[:, None] > 0)
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.where(valid, labels, 0).reshape(-1).long(), reduction="none")
        return {"loss_sum": float(torch.where(valid.reshape(-1), losses, 0).sum()),
                "count": float(valid.sum())}
    finally:
        model.train(was_training)


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


__all__ = ["TASKS", "compute_loss", "cross_entropy_loss", "eval_step", "learning_rate",
           "lr_factor", "make_optimizer", "scheduled_train_step", "train_step"]
