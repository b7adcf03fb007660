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


def _forward(fs, gs, x1: Tensor, x2: Tensor, shared, per_layer) -> tuple[Tensor, Tensor]:
    """Y1 = X1 + F(X2), Y2 = X2 + G(Y1), layer after layer."""
    for i, (f, g) in enumerate(zip(fs, gs)):
        kw = _slice(per_layer, i)
        x1 = x1 + _call(f, x2, shared, kw)
        x2 = x2 + _call(g, x1, shared, kw)
    return x1, x2


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


def _reprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer) -> tuple[Tensor, Tensor]:
    """Reprop: from the top, rebuild G's sub-block and backpropagate it, then F's."""
    for i in reversed(range(len(fs))):
        kw = _slice(per_layer, i)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            g_out = gs[i](y1, *shared, **kw)
        x2 = y2 - g_out.detach()
        dy1 = dy1 + _vjp(g_out, dy2, y1)  # dL/dY1 in total; G's params get dy2
        del g_out
        with torch.enable_grad():
            x2 = x2.requires_grad_()
            f_out = fs[i](x2, *shared, **kw)
        x1 = y1.detach() - f_out.detach()
        dx2 = dy2 + _vjp(f_out, dy1, x2)  # F's params get dL/dY1
        del f_out
        y1, y2, dy2 = x1, x2.detach(), dx2  # and dL/dX1 = dL/dY1, already in dy1
    return dy1, dy2


class _Rebuilt:
    """One layer rebuilt with its graphs kept: leaves y1 and x2, outputs g_out and f_out."""

    def __init__(self, f, g, y1: Tensor, y2: Tensor, shared, kw) -> None:
        with torch.enable_grad():
            self.y1 = y1.detach().requires_grad_()
            self.g_out = g(self.y1, *shared, **kw)
            self.x2 = (y2.detach() - self.g_out.detach()).requires_grad_()
            self.f_out = f(self.x2, *shared, **kw)
        self.x1 = self.y1.detach() - self.f_out.detach()

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


def _pareprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, s) -> tuple[Tensor, Tensor]:
    """PaReprop: rebuild the top layer; then at step i the grads of layer i overlap the rebuild
    of layer i-1; the grads of layer 0 end it.

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
        layer = _Rebuilt(fs[top], gs[top], y1, y2, shared, _slice(per_layer, top))
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
            with s.on(1 - k, ("rebuild", i - 1)):
                layer = _Rebuilt(fs[i - 1], gs[i - 1], x1, x2, shared, _slice(per_layer, i - 1))
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
        fs, gs, mode, n_shared, keys, has_params = spec
        shared, per_layer = tensors[:n_shared], dict(zip(keys, tensors[n_shared:]))
        y1, y2 = _forward(fs, gs, x1, x2, shared, per_layer)
        ctx.spec, ctx.autocast = spec, (x1.device.type, *_autocast_state(x1.device.type))
        ctx.save_for_backward(y1, y2, *tensors[: n_shared + len(keys)])
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2):
        fs, gs, mode, n_shared, keys, has_params = ctx.spec
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
        shared, per_layer = tuple(rest[:n_shared]), dict(zip(keys, rest[n_shared:]))
        device_type, enabled, dtype, cache = ctx.autocast
        replay = torch.autocast(device_type, dtype, enabled, cache) if enabled else None
        with replay or contextlib.nullcontext():  # F and G rebuilt under the forward's autocast
            if mode == "reprop":
                dx1, dx2 = _reprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer)
            else:
                s = _streams_for(y1.device)
                dx1, dx2 = _pareprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, s)
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

    Returns:
      (Y1, Y2). In reprop/pareprop only these (plus ``shared``/``per_layer``) are saved for
      backward, whatever the depth.
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
    spec = (tuple(fs), tuple(gs), mode, len(shared), tuple(per_layer), bool(params))
    return _apply(spec, x1, x2, tensors)
