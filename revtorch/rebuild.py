"""The rebuild check: how far the inputs the backward rebuilds are from the true ones.

``rebuild_errors`` runs a forward that saves every layer's input pair and the inverse from
the top, as the backward runs it (same precision policy, restarting at the same anchors),
and returns the per-layer relative error; ``check_rebuild`` raises ``RebuildError`` (or
warns) past a threshold, naming the layer. The twin of ``revjax/rebuild.py``;
docs/numerics.md has the measurements.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .core import _check_modules, _forward, _slice
from .numerics import anchor_every_of, stream_dtype_of, with_policy

CHECK_ACTIONS = ("raise", "warn")


class RebuildError(ValueError):
    """A rebuilt activation differs from the stored one by more than the threshold; the
    per-layer errors are in ``.errors``."""

    def __init__(self, message: str, errors=None) -> None:
        super().__init__(message)
        self.errors = errors


def _rel(rebuilt: Tensor, stored: Tensor) -> float:
    """``max|rebuilt - stored| / max|stored|`` in float64."""
    rebuilt, stored = rebuilt.double(), stored.double()
    scale, diff = stored.abs().max().item(), (rebuilt - stored).abs().max().item()
    return diff / scale if scale > 0 else diff


@torch.no_grad()
def rebuild_errors(
    fs: Sequence[nn.Module],
    gs: Sequence[nn.Module],
    x1: Tensor,
    x2: Tensor,
    shared: Sequence[Tensor] = (),
    per_layer: Mapping[str, Tensor] | None = None,
    *,
    stream_dtype: str | torch.dtype | None = None,
    anchor_every: int | None = None,
) -> list[float]:
    """Per-layer relative error of the inputs the backward rebuilds, against stored ones.

    A forward stores every layer's input pair; the inverse, run from the top as the backward
    runs it (same ``stream_dtype`` policy, restarting at the anchors of ``anchor_every``),
    rebuilds them. Entry i is the larger over the two streams of ``max|rebuilt - stored| /
    max|stored|`` for layer i's input (0 where an anchor gives it exactly). Call it under the
    autocast the model runs in, if any.
    """
    fs, gs = list(fs), list(gs)
    _check_modules(fs, gs)
    fs, gs, x1, x2 = with_policy(fs, gs, x1, x2, stream_dtype_of(stream_dtype))
    every = anchor_every_of(anchor_every)
    shared, per_layer = tuple(shared), dict(per_layer or {})
    stored = (1, [])
    y1, y2 = _forward(fs, gs, x1, x2, shared, per_layer, stored)
    errors = [0.0] * len(fs)
    for i in reversed(range(len(fs))):
        kw, (s1, s2) = _slice(per_layer, i), stored[1][i]
        exact = every is not None and i % every == 0
        y2 = s2 if exact else y2 - gs[i](y1, *shared, **kw)
        y1 = s1 if exact else y1 - fs[i](y2, *shared, **kw)
        errors[i] = max(_rel(y1, s1), _rel(y2, s2))
    return errors


def check_rebuild(fs, gs, x1, x2, shared=(), per_layer=None, *, threshold: float = 1e-2,
                  on_error: str = "raise", stream_dtype=None, anchor_every=None) -> list[float]:
    """Check that the backward's rebuild is exact enough: ``rebuild_errors``, then raise
    ``RebuildError`` (``on_error="raise"``) or warn with a ``RuntimeWarning`` (``"warn"``)
    when a layer's error passes ``threshold`` (or is not finite), naming the first layer from
    the top over it, its error and the worst layer. Returns the per-layer errors."""
    check_options(threshold, on_error)
    errors = rebuild_errors(fs, gs, x1, x2, shared, per_layer, stream_dtype=stream_dtype,
                            anchor_every=anchor_every)
    report_rebuild(errors, threshold, on_error, stacklevel=3)
    return errors


def check_options(threshold, on_error) -> None:
    if on_error not in CHECK_ACTIONS:
        raise ValueError(f"on_error must be one of {CHECK_ACTIONS}, got {on_error!r}")
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive relative error, got {threshold!r}")


def report_rebuild(errors, threshold: float, on_error: str = "raise", where: str = "",
                   stacklevel: int = 2) -> None:
    """Raise ``RebuildError`` or warn (``on_error``) when a per-layer error passes
    ``threshold`` or is not finite; ``where`` names the stack in the message."""
    bad = [i for i, e in enumerate(errors) if not e <= threshold]
    if not bad:
        return
    first = bad[-1]
    worst = max(range(len(errors)), key=lambda i: (errors[i] != errors[i], errors[i]))
    message = (
        f"reversible rebuild check{where}: the rebuilt input of layer {first} (of "
        f"{len(errors)}, rebuilt from the top) has relative error {errors[first]:.3g} > "
        f"threshold {threshold:g} (max|rebuilt - stored| / max|stored|); worst: layer "
        f"{worst}, {errors[worst]:.3g}; {len(bad)} layer(s) over. The backward's activations, "
        "and so the gradients, are that far off: keep the streams in float32 "
        "(stream_dtype='float32'), add anchors (anchor_every=k), or compute in a wider dtype."
    )
    if on_error == "raise":
        raise RebuildError(message, errors)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
