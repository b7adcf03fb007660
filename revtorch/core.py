"""The reversible core: a stack of two-stream blocks and its memory-saving backward passes.

One layer (RevNet, Gomez et al. 2017; Reversible ViT, Mangalam et al. 2022)::

    Y1 = X1 + F(X2)          X2 = Y2 - G(Y1)
    Y2 = X2 + G(Y1)          X1 = Y1 - F(X2)

Modes (``MODES``):

- ``backprop``: plain autograd through the layers; every layer's activations are saved.
- ``reprop``: the forward runs under ``no_grad`` and saves only the top outputs (Y1, Y2);
  the backward walks the layers from the top, rebuilding each layer's inputs from its outputs
  and backpropagating through the rebuilt sub-blocks, one sub-block graph alive at a time.
- ``pareprop`` (PaReprop, Zhu et al. 2023): the same backward, each layer split into a
  *rebuild* (G(Y1), X2, F(X2), X1 with graphs kept) and its *grads* (backward through the
  kept graphs); the grads of layer i overlap with the rebuild of layer i-1. On CUDA they run
  on two streams; elsewhere the same schedule runs in order.

Numerics options (as revjax's; docs/numerics.md has the measurements): ``stream_dtype`` (the
precision policy: the two streams and the inverse's subtractions in e.g. float32 while F and G
compute in the inputs' dtype), ``anchor_every=k`` (the exact stream pair stored every k layers,
where the backward's rebuild restarts) and ``check_rebuild`` / ``rebuild_errors`` (per-layer
relative error of the rebuilt inputs against stored ones, raising or warning past a threshold).

Parameter gradients (reprop, pareprop) accumulate into ``.grad`` through
``torch.autograd.backward`` on each rebuilt sub-graph, as in reentrant activation
checkpointing, so optimizers, clipping, AMP grad scalers and DDP hooks see them the normal way.
The autograd Function returns gradients for X1 and X2 only. Consequences, each a clear error:
``torch.autograd.grad`` and ``backward(inputs=...)`` are refused while F or G has parameters
that require grad (they would receive nothing, and ``.grad`` would change as a side effect);
double backward (``create_graph=True``) is refused. Under ``torch.compile`` the
reprop/pareprop Function is excluded from the graph (``torch.compiler.disable``: a graph
break; F and G run eagerly, compile them individually if wanted); ``backprop`` compiles
normally. ``torch.func`` transforms are not supported for reprop/pareprop.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

MODES = ("backprop", "reprop", "pareprop")
CALLER = 2  # stream index of the caller's stream; 0 and 1 are pareprop's two work streams


# ---------------------------------------------------------------------------------------------
# One layer, its checked forward and its inverse.


def _slice(per_layer: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Layer i's slice of the per-layer inputs."""
    return {k: v[i] for k, v in per_layer.items()}


def _call(m: nn.Module, x: Tensor, shared: tuple[Tensor, ...], kw: dict[str, Tensor]) -> Tensor:
    """``m(x, *shared, **kw)``, refusing a call that changes a registered buffer or the shape."""
    before = [(b, b._version) for b in m.buffers()]
    out = m(x, *shared, **kw)
    after = list(m.buffers())
    if len(after) != len(before) or any(
        a is not b or a._version != v for a, (b, v) in zip(after, before)
    ):
        raise ValueError(
            f"{type(m).__name__} changed a registered buffer during its call: F and G must not "
            "update state (e.g. BatchNorm running statistics in training mode), because "
            "reprop/pareprop call them again to rebuild activations"
        )
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{type(m).__name__} must return a tensor of shape {tuple(x.shape)}, got {got}"
        )
    return out


def _forward(fs, gs, x1: Tensor, x2: Tensor, shared, per_layer, anchors=None
             ) -> tuple[Tensor, Tensor]:
    """Y1 = X1 + F(X2), Y2 = X2 + G(Y1), layer after layer. ``anchors``: ``(every, list)``;
    the stream pairs entering layers 0, every, 2 every, ... are appended to the list."""
    for i, (f, g) in enumerate(zip(fs, gs)):
        if anchors is not None and i % anchors[0] == 0:
            anchors[1].append((x1, x2))
        kw = _slice(per_layer, i)
        x1 = x1 + _call(f, x2, shared, kw)
        x2 = x2 + _call(g, x1, shared, kw)
    return x1, x2


class _InCompute(nn.Module):
    """The precision policy for one half: ``m`` runs on its input cast to ``compute`` (the
    inputs' dtype) and its output is cast to ``stream`` before the residual addition."""

    def __init__(self, m: nn.Module, compute: torch.dtype, stream: torch.dtype) -> None:
        super().__init__()
        self.m, self.compute, self.stream = m, compute, stream

    def forward(self, x, *shared, **kw):
        return self.m(x.to(self.compute), *shared, **kw).to(self.stream)


def _stream_dtype(stream_dtype) -> torch.dtype | None:
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


def _anchor_every(anchor_every) -> int | None:
    """``anchor_every``: None or a positive int."""
    if anchor_every is None:
        return None
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, int):
        raise TypeError(f"anchor_every must be None or an int, got {anchor_every!r}")
    if anchor_every < 1:
        raise ValueError(f"anchor_every must be at least 1 (or None), got {anchor_every}")
    return anchor_every


def _with_policy(fs, gs, x1, x2, stream):
    """``(fs, gs, x1, x2)`` under the precision policy: the streams cast to ``stream`` and the
    halves computing in the inputs' dtype; unchanged when that is ``stream`` or it is None."""
    if stream is None or stream == x1.dtype:
        return fs, gs, x1, x2
    compute = x1.dtype
    wrap = lambda ms: [_InCompute(m, compute, stream) for m in ms]  # noqa: E731
    return wrap(fs), wrap(gs), x1.to(stream), x2.to(stream)


@torch.no_grad()
def inverse(
    fs: Sequence[nn.Module],
    gs: Sequence[nn.Module],
    y1: Tensor,
    y2: Tensor,
    shared: Sequence[Tensor] = (),
    per_layer: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The stack's inputs (X1, X2) from its outputs: X2 = Y2 - G(Y1), X1 = Y1 - F(X2), top down."""
    per_layer = per_layer or {}
    for i in reversed(range(len(fs))):
        kw = _slice(per_layer, i)
        y2 = y2 - gs[i](y1, *shared, **kw)
        y1 = y1 - fs[i](y2, *shared, **kw)
    return y1, y2


# ---------------------------------------------------------------------------------------------
# Backward building blocks.


def _vjp(out: Tensor, cotangent: Tensor, leaf: Tensor) -> Tensor:
    """Backpropagate ``cotangent`` through ``out`` (parameters' ``.grad`` accumulate); the
    gradient that reached ``leaf``."""
    if out.requires_grad:
        torch.autograd.backward(out, cotangent.to(out.dtype))
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _anchor_at(anchors, i: int):
    """The exact input pair of layer i when it is an anchor (``anchors``: ``(every, pairs)``),
    else None."""
    if anchors is None or i % anchors[0]:
        return None
    return anchors[1][i // anchors[0]]


def _reprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors=None
            ) -> tuple[Tensor, Tensor]:
    """Reprop: from the top, rebuild G's sub-block and backpropagate it, then F's; at an
    anchor the stored inputs replace the rebuilt ones."""
    for i in reversed(range(len(fs))):
        kw = _slice(per_layer, i)
        exact = _anchor_at(anchors, i)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            g_out = gs[i](y1, *shared, **kw)
        x2 = y2 - g_out.detach() if exact is None else exact[1].detach()
        dy1 = dy1 + _vjp(g_out, dy2, y1)  # dL/dY1 in total; G's params get dy2
        del g_out
        with torch.enable_grad():
            x2 = x2.requires_grad_()
            f_out = fs[i](x2, *shared, **kw)
        x1 = y1.detach() - f_out.detach() if exact is None else exact[0].detach()
        dx2 = dy2 + _vjp(f_out, dy1, x2)  # F's params get dL/dY1
        del f_out
        y1, y2, dy2 = x1, x2.detach(), dx2  # and dL/dX1 = dL/dY1, already in dy1
    return dy1, dy2


class _Rebuilt:
    """One layer rebuilt with its graphs kept: leaves y1 and x2, outputs g_out and f_out.
    ``exact``: the layer's stored input pair (an anchor), replacing the rebuilt one."""

    def __init__(self, f, g, y1: Tensor, y2: Tensor, shared, kw, exact=None) -> None:
        with torch.enable_grad():
            self.y1 = y1.detach().requires_grad_()
            self.g_out = g(self.y1, *shared, **kw)
            x2 = y2.detach() - self.g_out.detach() if exact is None else exact[1].detach()
            self.x2 = x2.requires_grad_()
            self.f_out = f(self.x2, *shared, **kw)
        self.x1 = self.y1.detach() - self.f_out.detach() if exact is None else exact[0].detach()

    def grads(self, dy1: Tensor, dy2: Tensor) -> tuple[Tensor, Tensor]:
        """(dL/dX1, dL/dX2) from (dL/dY1, dL/dY2); G's and F's params get theirs."""
        dy1 = dy1 + _vjp(self.g_out, dy2, self.y1)
        return dy1, dy2 + _vjp(self.f_out, dy1, self.x2)


# ---------------------------------------------------------------------------------------------
# PaReprop's schedule, written once over a tiny streams abstraction.


class InOrderStreams:
    """Streams for devices without them: everything runs in order on the caller's thread."""

    def on(self, k: int, label: tuple[str, int]) -> contextlib.AbstractContextManager:
        """Run the enclosed work (``label`` = ("rebuild" | "grads", layer)) on stream k."""
        return contextlib.nullcontext()

    def record(self, k: int) -> Any:
        """An event marking the work enqueued so far on stream k."""
        return None

    def wait(self, k: int, event: Any) -> None:
        """Stream k's later work waits for ``event`` (on the device, never on the host)."""

    def keep(self, tensor: Tensor, k: int) -> None:
        """``tensor``, allocated on another stream, is used on stream k (``record_stream``)."""


class CudaStreams(InOrderStreams):
    """Two fresh CUDA streams (0, 1) plus the caller's current stream (``CALLER``)."""

    def __init__(self, device: torch.device) -> None:
        caller = torch.cuda.current_stream(device)
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device), caller)

    def on(self, k, label):
        return torch.cuda.stream(self.streams[k])

    def record(self, k):
        return self.streams[k].record_event()

    def wait(self, k, event):
        self.streams[k].wait_event(event)

    def keep(self, tensor, k):
        tensor.record_stream(self.streams[k])


def _streams_for(device: torch.device) -> InOrderStreams:
    """The streams PaReprop runs on for ``device`` (tests replace this to record the schedule)."""
    return CudaStreams(device) if device.type == "cuda" else InOrderStreams()


def _pareprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors, s
              ) -> tuple[Tensor, Tensor]:
    """PaReprop: rebuild the top layer; then at step i the grads of layer i overlap the rebuild
    of layer i-1 (restarting from its anchor, if it has one); the grads of layer 0 end it.

    Layer i is rebuilt on stream i % 2 and its grads run there too: autograd runs each backward
    op on its forward op's stream, so "grads on one stream, rebuilds on the other" is not
    expressible. The two streams alternate roles; events order the two cross-stream hand-offs
    (rebuilt inputs X1, X2 going down; gradients dX1, dX2 going down). Every tensor handed to
    another stream is ``keep``-ed for it (the caching allocator's ``record_stream`` rule), and
    nothing here reads a device value on the host (tests/revtorch/test_core.py audits both).
    """
    top = len(fs) - 1
    start = s.record(CALLER)  # y1, y2, dy1, dy2 were made on the caller's stream
    s.wait(0, start)
    s.wait(1, start)
    for t in (y1, y2, dy1, dy2):
        s.keep(t, top % 2)
    with s.on(top % 2, ("rebuild", top)):
        layer = _Rebuilt(fs[top], gs[top], y1, y2, shared, _slice(per_layer, top),
                         _anchor_at(anchors, top))
    rebuilt, grads_done = s.record(top % 2), start
    for i in range(top, -1, -1):
        k = i % 2
        s.wait(k, grads_done)  # dy1, dy2 from layer i+1's grads (at the top: from the caller)
        with s.on(k, ("grads", i)):  # after layer i's rebuild: same stream, enqueued earlier
            dy1, dy2 = layer.grads(dy1, dy2)
        grads_done = s.record(k)
        x1, x2, layer = layer.x1, layer.x2.detach(), None  # frees layer i's graphs
        for t in (dy1, dy2):
            s.keep(t, 1 - k if i > 0 else CALLER)
        if i > 0:
            s.wait(1 - k, rebuilt)  # x1, x2 from layer i's rebuild; not its grads
            s.keep(x1, 1 - k)
            s.keep(x2, 1 - k)
            exact = _anchor_at(anchors, i - 1)
            for t in exact or ():  # made on the caller's stream in the forward
                s.keep(t, 1 - k)
            with s.on(1 - k, ("rebuild", i - 1)):
                layer = _Rebuilt(fs[i - 1], gs[i - 1], x1, x2, shared, _slice(per_layer, i - 1),
                                 exact)
            rebuilt = s.record(1 - k)
    # A parameter's first gradient becomes its .grad where it was made, on a work stream; the
    # caller's stream (the optimizer) reads it next, so the allocator must know (as for dy).
    for p in {id(p): p for m in (*fs, *gs) for p in m.parameters()}.values():
        if p.grad is not None:
            s.keep(p.grad, CALLER)
    s.wait(CALLER, grads_done)  # the result is handed back on the caller's stream
    return dy1, dy2


# ---------------------------------------------------------------------------------------------
# The autograd Function and the functional entry.


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype, bool]:
    return (
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        torch.is_autocast_cache_enabled(),
    )


class _Reversible(torch.autograd.Function):
    """Forward under no_grad saving (Y1, Y2) and the non-differentiated inputs; backward by
    reprop or pareprop. Returns gradients for X1 and X2 only (see the module docstring)."""

    @staticmethod
    def forward(ctx, spec, x1, x2, *tensors):
        fs, gs, mode, n_shared, keys, has_params, every = spec
        shared, per_layer = tensors[:n_shared], dict(zip(keys, tensors[n_shared:]))
        anchors = None if every is None else (every, [])
        y1, y2 = _forward(fs, gs, x1, x2, shared, per_layer, anchors)
        ctx.spec, ctx.autocast = spec, (x1.device.type, *_autocast_state(x1.device.type))
        pairs = [t for pair in (anchors[1] if anchors else ()) for t in pair]
        ctx.save_for_backward(y1, y2, *tensors[: n_shared + len(keys)], *pairs)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2):
        fs, gs, mode, n_shared, keys, has_params, every = ctx.spec
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"revtorch: double backward (create_graph=True) is not supported in mode "
                f"{mode!r}; use mode='backprop'"
            )
        if has_params and not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                f"revtorch: mode {mode!r} accumulates parameter gradients into .grad during "
                "backward, so torch.autograd.grad(...) and backward(inputs=...) are not "
                "supported; call loss.backward() and read .grad, or use mode='backprop'"
            )
        y1, y2, *rest = ctx.saved_tensors
        y1, y2 = y1.detach(), y2.detach()  # saved outputs come back attached to this node
        n_in = n_shared + len(keys)
        shared, per_layer = tuple(rest[:n_shared]), dict(zip(keys, rest[n_shared:n_in]))
        pairs = rest[n_in:]
        anchors = None if every is None else (every, list(zip(pairs[::2], pairs[1::2])))
        device_type, enabled, dtype, cache = ctx.autocast
        replay = torch.autocast(device_type, dtype, enabled, cache) if enabled else None
        with replay or contextlib.nullcontext():  # F and G rebuilt under the forward's autocast
            if mode == "reprop":
                dx1, dx2 = _reprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors)
            else:
                s = _streams_for(y1.device)
                dx1, dx2 = _pareprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors, s)
        n_tensors = len(ctx.needs_input_grad) - 3
        return (None, dx1, dx2) + (None,) * n_tensors


@torch.compiler.disable
def _apply(spec, x1: Tensor, x2: Tensor, tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    return _Reversible.apply(spec, x1, x2, *tensors)


def _check_modules(fs: Sequence[nn.Module], gs: Sequence[nn.Module]) -> None:
    if len(fs) != len(gs):
        raise ValueError(f"need one F and one G per layer, got {len(fs)} F and {len(gs)} G")
    if len(fs) == 0:
        raise ValueError("depth must be at least 1, got 0 layers")
    for m in (*fs, *gs):
        if not isinstance(m, nn.Module):
            raise TypeError(f"F and G must be nn.Module instances, got {type(m).__name__}")
        for sub in m.modules():
            batchnorm = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            if batchnorm and sub.training and sub.track_running_stats:
                raise ValueError(
                    f"{type(sub).__name__} in training mode updates running statistics during "
                    "its call; F and G must not update state (use LayerNorm, eval mode, or "
                    "track_running_stats=False)"
                )
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
                raise ValueError(
                    f"{type(sub).__name__}(p={sub.p}) in training mode draws random numbers "
                    "during its call; F and G must be deterministic so that reprop/pareprop "
                    "rebuild the same activations (pass the randomness in per_layer)"
                )


def reversible(
    fs: Sequence[nn.Module],
    gs: Sequence[nn.Module],
    x1: Tensor,
    x2: Tensor,
    shared: Sequence[Tensor] = (),
    per_layer: Mapping[str, Tensor] | None = None,
    *,
    mode: str,
    stream_dtype: str | torch.dtype | None = None,
    anchor_every: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the reversible stack ``Y1 = X1 + F_i(X2), Y2 = X2 + G_i(Y1)`` for i = 0..depth-1.

    Args:
      fs, gs: one F and one G module per layer, called ``f(x, *shared, **per_layer_slice)``.
        They must not update state during a call (BatchNorm running statistics, dropout).
      x1, x2: the two input streams, same shape, dtype and device.
      shared: tensors given to every layer (e.g. a padding mask). Detached: their gradient is
        exactly zero (``.grad`` stays None).
      per_layer: name -> tensor with a leading depth axis; layer i gets ``{name: t[i]}``, to
        both F and G. Detached, like ``shared``.
      mode: one of ``MODES``; see the module docstring for what reprop/pareprop support.
      stream_dtype: the precision policy (every mode). None: the streams stay in the inputs'
        dtype. A floating dtype (``torch.float32`` or ``"float32"`` with bfloat16 inputs):
        both streams, their additions and the inverse's subtractions are held in it, while
        F and G compute in the inputs' dtype (input cast to it, output cast to
        ``stream_dtype`` before the addition). (Y1, Y2) come back in ``stream_dtype``.
      anchor_every: None, or k >= 1 (reprop/pareprop; backprop ignores it): the forward also
        saves the exact stream pair entering layers 0, k, 2k, ... (``ceil(depth / k)``
        pairs) and the backward restarts its rebuild from them.

    Returns:
      (Y1, Y2). In reprop/pareprop only these (plus ``shared``/``per_layer`` and the anchors)
      are saved for backward, whatever the depth.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not isinstance(x1, Tensor) or not isinstance(x2, Tensor):
        got = f"{type(x1).__name__} and {type(x2).__name__}"
        raise TypeError(f"x1 and x2 must be tensors, got {got}")
    if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
        raise ValueError(
            "x1 and x2 must match in shape, dtype and device, got "
            f"{tuple(x1.shape)} {x1.dtype} {x1.device} and {tuple(x2.shape)} {x2.dtype} {x2.device}"
        )
    fs, gs = list(fs), list(gs)
    _check_modules(fs, gs)
    fs, gs, x1, x2 = _with_policy(fs, gs, x1, x2, _stream_dtype(stream_dtype))
    every = _anchor_every(anchor_every)
    for t in shared:
        if not isinstance(t, Tensor):
            raise TypeError(f"shared inputs must be tensors, got {type(t).__name__}")
    per_layer = dict(per_layer or {})
    for k, v in per_layer.items():
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != len(fs):
            raise ValueError(
                f"per_layer[{k!r}] must be a tensor with leading axis {len(fs)} (the depth)"
            )
    shared = tuple(t.detach() for t in shared)
    per_layer = {k: v.detach() for k, v in per_layer.items()}

    params = [p for m in (*fs, *gs) for p in m.parameters() if p.requires_grad]
    needs_graph = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or params)
    if mode == "backprop" or not needs_graph:
        return _forward(fs, gs, x1, x2, shared, per_layer)
    # Parameters are not inputs of the Function: the backward accumulates their gradients
    # itself (as inputs, their post-accumulate-grad and DDP hooks would fire twice). When
    # neither X requires grad, an empty leaf that does makes Y require grad.
    tensors = [*shared, *per_layer.values()]
    if not (x1.requires_grad or x2.requires_grad):
        tensors.append(torch.empty(0, device=x1.device, requires_grad=True))
    spec = (tuple(fs), tuple(gs), mode, len(shared), tuple(per_layer), bool(params), every)
    return _apply(spec, x1, x2, tensors)


# ---------------------------------------------------------------------------------------------
# The rebuild check.

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
    fs, gs, x1, x2 = _with_policy(fs, gs, x1, x2, _stream_dtype(stream_dtype))
    every = _anchor_every(anchor_every)
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
    _check_options(threshold, on_error)
    errors = rebuild_errors(fs, gs, x1, x2, shared, per_layer, stream_dtype=stream_dtype,
                            anchor_every=anchor_every)
    report_rebuild(errors, threshold, on_error, stacklevel=3)
    return errors


def _check_options(threshold, on_error) -> None:
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
