"""RevStack: a stack of reversible layers as an ``nn.Module``, the mode a switch on the call;
ResidualStack: its standard (non-reversible) twin."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts, noop_context_fn)

from revtorch.core import DEFAULT_MODE, MODES, _slice, reversible
from revtorch.numerics import anchor_every_of, stream_dtype_of
from revtorch.rebuild import RebuildError, check_options, check_rebuild, report_rebuild


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return mode


class RevStack(nn.Module):
    """``depth`` reversible layers ``Y1 = X1 + F_i(X2), Y2 = X2 + G_i(Y1)``.

    Args:
      make_f, make_g: called once per layer, each returns an ``nn.Module`` called as
        ``f(x, *shared, **per_layer_slice)`` (so it must accept keyword arguments it does not
        use, e.g. with ``**kwargs``). F and G must not update state during a call.
      depth: number of layers, at least 1.
      mode: the default mode, one of ``MODES``; a call may override it.
      stream_dtype, anchor_every: the numerics options of ``revtorch.reversible`` (None, or
        e.g. ``"float32"``: the two streams and the inverse's subtractions in that dtype while
        F and G compute in the inputs' dtype; None, or k: the exact streams saved every k
        layers, where the backward's rebuild restarts). ``check_rebuild`` measures the rebuild.

    The layers live in ``self.f`` and ``self.g`` (``nn.ModuleList``, one entry per layer).
    """

    def __init__(
        self,
        make_f: Callable[[], nn.Module],
        make_g: Callable[[], nn.Module],
        *,
        depth: int,
        mode: str = DEFAULT_MODE,
        stream_dtype: str | torch.dtype | None = None,
        anchor_every: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int, got {type(depth).__name__}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.mode = _check_mode(mode)
        self.stream_dtype = stream_dtype_of(stream_dtype)
        self.anchor_every = anchor_every_of(anchor_every)
        self.f = nn.ModuleList(_made(make_f, "make_f") for _ in range(depth))
        self.g = nn.ModuleList(_made(make_g, "make_g") for _ in range(depth))

    @property
    def depth(self) -> int:
        return len(self.f)

    def forward(
        self,
        x1: Tensor,
        x2: Tensor,
        *shared: Tensor,
        per_layer: Mapping[str, Tensor] | None = None,
        mode: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(Y1, Y2) from (X1, X2). ``shared`` tensors go to every layer and ``per_layer``
        tensors (leading axis ``depth``) are sliced per layer; neither is differentiated (their
        gradient is exactly zero). ``mode`` overrides the default for this call."""
        mode = _check_mode(self.mode if mode is None else mode)
        if _CHECKS:  # inside ``check_rebuilds``
            _CHECKS[-1].check(self, x1, x2, shared, per_layer)
        return reversible(self.f, self.g, x1, x2, shared, per_layer, mode=mode,
                          stream_dtype=self.stream_dtype, anchor_every=self.anchor_every)

    def check_rebuild(self, x1: Tensor, x2: Tensor, *shared: Tensor,
                      per_layer: Mapping[str, Tensor] | None = None, threshold: float = 1e-2,
                      on_error: str = "raise") -> list[float]:
        """Per-layer relative errors of the inputs the backward rebuilds for this call
        (``revtorch.check_rebuild`` with this stack's ``stream_dtype`` and
        ``anchor_every``); raises ``RebuildError`` or warns past ``threshold``."""
        return check_rebuild(self.f, self.g, x1, x2, shared, per_layer, threshold=threshold,
                             on_error=on_error, stream_dtype=self.stream_dtype,
                             anchor_every=self.anchor_every)

    def extra_repr(self) -> str:
        numerics = "".join(f", {k}={getattr(self, k)!r}" for k in ("stream_dtype", "anchor_every")
                           if getattr(self, k) is not None)
        return f"depth={self.depth}, mode={self.mode!r}" + numerics


_CHECKS: list = []  # the active ``check_rebuilds`` blocks


class _Checks:
    """One ``check_rebuilds`` block: its options and the per-call reports."""

    def __init__(self, threshold, on_error) -> None:
        check_options(threshold, on_error)
        self.threshold, self.on_error, self.reports = threshold, on_error, []

    def check(self, stack, x1, x2, shared, per_layer) -> None:
        n = len(self.reports)
        try:
            errors = stack.check_rebuild(x1, x2, *shared, per_layer=per_layer,
                                         threshold=float("inf"))
        except RebuildError as e:  # only for a non-finite error; reported below
            errors = e.errors
        self.reports.append({"call": n, "depth": stack.depth, "errors": errors})
        report_rebuild(errors, self.threshold, self.on_error, f" (RevStack call {n})",
                       stacklevel=5)


@contextlib.contextmanager
def check_rebuilds(threshold: float = 1e-2, on_error: str = "raise"):
    """A check mode for whole models: inside the block, every ``RevStack`` call first checks
    its rebuild (``RevStack.check_rebuild``, under the caller's autocast) and raises
    ``RebuildError`` or warns, naming the call (in order, from 0) and the layer. Yields the
    list of reports, one dict per call: ``call``, ``depth``, ``errors`` (per layer)."""
    checks = _Checks(threshold, on_error)
    _CHECKS.append(checks)
    try:
        yield checks.reports
    finally:
        _CHECKS.remove(checks)


class ResidualStack(nn.Module):
    """The standard (non-reversible) twin of ``RevStack``: ``x = x + F_i(x); x = x + G_i(x)``
    per layer on one stream, with the same F and G, under plain autograd (backprop only).

    Args and layout as ``RevStack`` (``self.f``, ``self.g``), without ``mode``. Called
    ``stack(x, *shared, per_layer=None)``; ``shared`` and ``per_layer`` are detached.

    ``remat`` (a name in ``REMAT_POLICIES``, or None): rematerialise each layer in the
    backward with ``torch.utils.checkpoint`` (non-reentrant), saving only what the policy
    names (``nothing_saveable``: the layer inputs; ``dots_with_no_batch_dims_saveable``: also
    the outputs of the weight matmuls, by selective checkpointing). The usual alternative to
    a reversible model; set it on a built model with ``set_remat``.
    """

    def __init__(
        self,
        make_f: Callable[[], nn.Module],
        make_g: Callable[[], nn.Module],
        *,
        depth: int,
        remat: str | None = None,
    ) -> None:
        super().__init__()
        self.f, self.g = _layers(make_f, make_g, depth)
        self.remat = _check_remat(remat)

    @property
    def depth(self) -> int:
        return len(self.f)

    def forward(
        self, x: Tensor, *shared: Tensor, per_layer: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        shared = tuple(t.detach() for t in shared)
        per_layer = {k: v.detach() for k, v in (per_layer or {}).items()}
        for k, v in per_layer.items():
            if v.dim() == 0 or v.shape[0] != self.depth:
                raise ValueError(
                    f"per_layer[{k!r}] must be a tensor with leading axis {self.depth} (the depth)"
                )
        remat = _check_remat(self.remat) if torch.is_grad_enabled() else None
        for i, (f, g) in enumerate(zip(self.f, self.g)):
            kw = _slice(per_layer, i)
            if remat is None:
                x = _residual_layer(f, g, x, shared, kw)
            else:
                x = checkpoint(_residual_layer, f, g, x, shared, kw, use_reentrant=False,
                               context_fn=_REMAT_CONTEXTS[remat])
        return x

    def extra_repr(self) -> str:
        return f"depth={self.depth}" + (f", remat={self.remat!r}" if self.remat else "")


def _residual_layer(f: nn.Module, g: nn.Module, x: Tensor, shared, kw) -> Tensor:
    x = x + f(x, *shared, **kw)
    return x + g(x, *shared, **kw)


REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable")
_WEIGHT_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _save_weight_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep the outputs of 2-D (weight) matmuls, recompute the rest
    (batched matmuls such as attention's included), as jax's dots_with_no_batch_dims."""
    return (CheckpointPolicy.MUST_SAVE if op in _WEIGHT_MATMULS
            else CheckpointPolicy.PREFER_RECOMPUTE)


_REMAT_CONTEXTS = {
    "nothing_saveable": noop_context_fn,
    "dots_with_no_batch_dims_saveable":
        partial(create_selective_checkpoint_contexts, _save_weight_matmuls),
}


def _check_remat(policy: str | None) -> str | None:
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"remat must be None or one of {REMAT_POLICIES}, got {policy!r}")
    return policy


def set_remat(model: nn.Module, policy: str | None) -> nn.Module:
    """Set per-layer rematerialisation (``ResidualStack``'s ``remat``) on every standard
    stack in ``model``, in place; returns ``model``. Raises for a model without one (the
    reversible models keep no per-layer activations already: use ``mode="reprop"``)."""
    _check_remat(policy)
    stacks = [m for m in model.modules() if isinstance(m, ResidualStack)]
    if not stacks:
        raise ValueError(
            f"{type(model).__name__} has no ResidualStack to rematerialise: remat is for the "
            "standard twins; a reversible model needs none (use mode='reprop' or 'pareprop')")
    for stack in stacks:
        stack.remat = policy
    return model


def _layers(make_f, make_g, depth: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``depth`` fresh F and G modules, after checking ``depth``."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {type(depth).__name__}")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    f = nn.ModuleList(_made(make_f, "make_f") for _ in range(depth))
    g = nn.ModuleList(_made(make_g, "make_g") for _ in range(depth))
    return f, g


def _made(make: Callable[[], nn.Module], name: str) -> nn.Module:
    m = make()
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name}() must return an nn.Module, got {type(m).__name__}")
    return m
