"""The reversible core: a stack of two-stream layers and its memory-saving backward passes.

Layer i maps (X1, X2) to (Y1, Y2) in two halves, F then G (RevNet, Gomez et al. 2017;
Reversible ViT, Mangalam et al. 2022)::

    Y1 = X1 + F(X2)          X2 = Y2 - G(Y1)      (inverse, used by the backward)
    Y2 = X2 + G(Y1)          X1 = Y1 - F(X2)

The backward walks the halves from the top, G_{D-1}, F_{D-1}, G_{D-2}, ..., G_0, F_0, along
two chains (``_Half``):

- the rebuild chain: G_i computes G(Y1) from (Y1, Y2) with its graph kept (leaf Y1) and
  X2 = Y2 - G(Y1); F_i computes F(X2) from (Y1, X2) with its graph kept (leaf X2) and
  X1 = Y1 - F(X2). At an anchor the stored exact stream replaces the rebuilt one. The
  rebuild of half k+1 reads only the streams half k rebuilt, never a gradient.
- the gradient chain: G_i takes dX1 = dY1 + dG^T dY2, F_i then dX2 = dY2 + dF^T dX1, each
  half's parameters getting theirs in ``.grad``. The gradient of half k reads half k's
  graph and the cotangents of half k-1's gradient, never a rebuilt stream of half k+1.

Modes (``MODES``):

- ``backprop``: plain autograd through the layers; every layer's activations are saved.
- ``reprop``: the forward runs under ``no_grad`` and saves only (Y1, Y2); the backward
  rebuilds each half and at once backpropagates it.
- ``pareprop`` (PaReprop, Zhu et al. 2023), at the granularity of halves: the gradient of
  half k and the rebuild of half k+1 share no data, so each step runs them side by side:
  after rebuilding G_{D-1}, per layer i from the top, (a) the gradient of G_i beside the
  rebuild of F_i, (b) the gradient of F_i beside the rebuild of G_{i-1}. A half's graph
  lives from its rebuild (one step) to its gradient (the next), so at most two halves'
  graphs are alive, a layer's worth as in reprop, and each half still costs one rebuild and
  one backward. On CUDA the G halves run on one stream and the F halves on another
  (``streams``); elsewhere the same schedule runs in order.

Numerics options (``numerics``): ``stream_dtype`` (the precision policy) and
``anchor_every`` (exact stream pairs saved every k layers, where the rebuild restarts); the
rebuild check is in ``rebuild``. docs/numerics.md has the measurements.

Parameter gradients (reprop, pareprop) accumulate into ``.grad`` through
``torch.autograd.backward`` on each rebuilt half's graph, as in reentrant activation
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

import torch
from torch import Tensor, nn

from . import streams
from .numerics import anchor_at, anchor_every_of, stream_dtype_of, with_policy
from .streams import CALLER, InOrderStreams

MODES = ("backprop", "reprop", "pareprop")
DEFAULT_MODE = "reprop"  # models' and stacks' mode when none is given (README: why)
G_STREAM, F_STREAM = 0, 1  # pareprop's work streams: G halves on one, F halves on the other


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
# The two chains, one half at a time.


class _Half:
    """One half rebuilt with its graph kept: ``out = m(leaf)`` on a fresh leaf, and the stream
    it gives back, ``rebuilt = other - out`` (or ``exact``, the anchor's stored stream).
    G_i: leaf Y1, other Y2, rebuilt X2. F_i: leaf X2, other Y1, rebuilt X1."""

    def __init__(self, m: nn.Module, leaf: Tensor, other: Tensor, shared, kw,
                 exact: Tensor | None = None) -> None:
        with torch.enable_grad():
            self.leaf = leaf.detach().requires_grad_()
            self.out = m(self.leaf, *shared, **kw)
        self.rebuilt = other.detach() - self.out.detach() if exact is None else exact.detach()

    def vjp(self, cotangent: Tensor) -> Tensor:
        """Backpropagate ``cotangent`` through ``out`` (freeing its graph; the parameters'
        ``.grad`` accumulate); the gradient that reached the leaf."""
        if self.out.requires_grad:
            torch.autograd.backward(self.out, cotangent.to(self.out.dtype))
        return self.leaf.grad if self.leaf.grad is not None else torch.zeros_like(self.leaf)


def _reprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors=None
            ) -> tuple[Tensor, Tensor]:
    """Reprop: from the top, each half rebuilt and at once backpropagated, G_i then F_i."""
    for i in reversed(range(len(fs))):
        kw, (x1_exact, x2_exact) = _slice(per_layer, i), anchor_at(anchors, i)
        g = _Half(gs[i], y1, y2, shared, kw, x2_exact)  # X2 = Y2 - G(Y1)
        dy1 = dy1 + g.vjp(dy2)  # dX1 = dY1 + dG^T dY2
        x2, g = g.rebuilt, None  # frees G_i's graph
        f = _Half(fs[i], x2, y1, shared, kw, x1_exact)  # X1 = Y1 - F(X2)
        dy2 = dy2 + f.vjp(dy1)  # dX2 = dY2 + dF^T dX1
        y1, y2, f = f.rebuilt, x2, None
    return dy1, dy2


def _pareprop(fs, gs, y1, y2, dy1, dy2, shared, per_layer, anchors, s: InOrderStreams
              ) -> tuple[Tensor, Tensor]:
    """PaReprop: rebuild G_{D-1}; then per layer i from the top, (a) the gradient of G_i
    beside the rebuild of F_i, (b) the gradient of F_i beside the rebuild of G_{i-1}.

    A half's gradient runs on the stream it was rebuilt on (autograd runs each backward op on
    its forward op's stream): G halves on ``G_STREAM``, F halves on ``F_STREAM``. Events
    order the cross-stream hand-offs, the rebuilt streams going down (G_i -> F_i -> G_{i-1})
    and the gradients going down (likewise); every tensor read on a stream other than the
    one that made it is ``keep``-ed for it (the caching allocator's ``record_stream`` rule),
    and nothing here reads a device value on the host (tests/revtorch/test_core.py audits
    the schedule, the keeps and the host reads). Each step enqueues the gradient first, so
    run in order (CPU) a half's graph is freed before the next is built, as in reprop.
    """
    G, F = G_STREAM, F_STREAM

    def rebuild(k: int, i: int, leaf: Tensor, other: Tensor, exact: Tensor | None):
        """Half k (``G`` or ``F``) of layer i rebuilt on its stream; (the half, its event)."""
        if exact is not None:
            s.keep(exact, k)  # saved by the forward on the caller's stream
        with s.on(k, ("rebuild", "GF"[k], i)):
            half = _Half((gs, fs)[k][i], leaf, other, shared, _slice(per_layer, i), exact)
        return half, s.record(k)

    top = len(fs) - 1
    s.wait(G, s.record(CALLER))  # Y1, Y2, dY1, dY2 come from the caller's stream
    for t in (y1, y2, dy1, dy2):
        s.keep(t, G)
    for t in (y1, dy2):  # also read by F_{D-1}'s rebuild and gradient
        s.keep(t, F)
    g, g_rebuilt = rebuild(G, top, y1, y2, anchor_at(anchors, top)[1])
    for i in range(top, -1, -1):
        # (a) the gradient of G_i beside the rebuild of F_i
        if i < top:
            s.wait(G, f_grads)  # dY2 from F_{i+1}'s gradient
        with s.on(G, ("grads", "G", i)):
            dy1 = dy1 + g.vjp(dy2)  # dX1 = dY1 + dG^T dY2
        g_grads, x2, g = s.record(G), g.rebuilt, None  # frees G_i's graph
        s.keep(x2, F)
        s.keep(dy1, F)
        s.wait(F, g_rebuilt)  # X2 from G_i's rebuild
        f, f_rebuilt = rebuild(F, i, x2, y1, anchor_at(anchors, i)[0])
        # (b) the gradient of F_i beside the rebuild of G_{i-1}
        s.wait(F, g_grads)  # dX1 from G_i's gradient
        with s.on(F, ("grads", "F", i)):
            dy2 = dy2 + f.vjp(dy1)  # dX2 = dY2 + dF^T dX1
        f_grads, y1, y2, f = s.record(F), f.rebuilt, x2, None  # frees F_i's graph
        s.keep(dy2, G if i else CALLER)
        if i:
            s.keep(y1, G)
            s.wait(G, f_rebuilt)  # X1 from F_i's rebuild
            g, g_rebuilt = rebuild(G, i - 1, y1, y2, anchor_at(anchors, i - 1)[1])
    # A parameter's first gradient becomes its .grad where it was made, on a work stream; the
    # caller's stream (the optimizer) reads it next, so the allocator must know (as for dX).
    for p in {id(p): p for m in (*fs, *gs) for p in m.parameters()}.values():
        if p.grad is not None:
            s.keep(p.grad, CALLER)
    s.keep(dy1, CALLER)
    s.wait(CALLER, f_grads)  # F_0's gradient, after all other work: the result is ready
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
                s = streams.streams_for(y1.device)
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
    fs, gs, x1, x2 = with_policy(fs, gs, x1, x2, stream_dtype_of(stream_dtype))
    every = anchor_every_of(anchor_every)
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
