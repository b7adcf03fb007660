"""The numerics options of the reversible stack: the precision policy and anchors.

* ``stream_dtype``: None keeps the streams in the inputs' dtype; a floating dtype (e.g.
  ``"float32"`` with bfloat16 inputs) holds both streams, their additions and the inverse's
  subtractions in it while F and G compute in the inputs' dtype: each half gets its input
  cast down and its output cast up before the addition (``with_policy``).
* ``anchor_every=k``: the forward also saves the exact stream pair entering layers 0, k,
  2k, ... (one pair per anchor) and the backward's rebuild restarts from it there, so the
  rebuild drift spans at most k layers (``anchor_at``).

The twin of ``revjax/numerics.py``; docs/numerics.md has the measurements.
"""

from __future__ import annotations

import torch
from torch import nn


def stream_dtype_of(stream_dtype) -> torch.dtype | None:
    """``stream_dtype`` (None, a name like ``"float32"`` or a ``torch.dtype``) as a floating
    ``torch.dtype``."""
    if stream_dtype is None:
        return None
    dtype = stream_dtype
    if isinstance(stream_dtype, str):
        dtype = getattr(torch, stream_dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown stream_dtype {stream_dtype!r}; use None or a floating "
                         "dtype such as 'float32'")
    if not dtype.is_floating_point:
        raise ValueError(f"stream_dtype must be a floating dtype, got {dtype}")
    return dtype


def anchor_every_of(anchor_every) -> int | None:
    """``anchor_every``: None or a positive int."""
    if anchor_every is None:
        return None
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, int):
        raise TypeError(f"anchor_every must be None or an int, got {anchor_every!r}")
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be at least 1 (or None), got {anchor_every}")
    return anchor_every


class _InCompute(nn.Module):
    """The precision policy for one half: ``m`` runs on its input cast to ``compute`` (the
    inputs' dtype) and its output is cast to ``stream`` before the residual addition."""

    def __init__(self, m: nn.Module, compute: torch.dtype, stream: torch.dtype) -> None:
        super().__init__()
        self.m, self.compute, self.stream = m, compute, stream

    def forward(self, x, *shared, **kw):
        return self.m(x.to(self.compute), *shared, **kw).to(self.stream)


def with_policy(fs, gs, x1, x2, stream):
    """``(fs, gs, x1, x2)`` under the precision policy: the streams cast to ``stream`` and the
    halves computing in the inputs' dtype (``_InCompute``); unchanged when that is ``stream``
    already or ``stream`` is None."""
    if stream is None or stream == x1.dtype:
        return fs, gs, x1, x2
    compute = x1.dtype
    wrap = lambda ms: [_InCompute(m, compute, stream) for m in ms]  # noqa: E731
    return wrap(fs), wrap(gs), x1.to(stream), x2.to(stream)


def anchor_at(anchors, i: int):
    """The exact input pair ``(X1, X2)`` of layer i when it is an anchor (``anchors``:
    ``(every, pairs)``, the pairs the forward saved), else ``(None, None)``."""
    if anchors is None or i % anchors[0]:
        return None, None
    return anchors[1][i // anchors[0]]
