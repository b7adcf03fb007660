"""Stages of a hierarchical model and the fusion of its two streams (Rev-Swin, Rev-MViT).

A hierarchical model is a chain of stages. Each stage is a stack of layers (``RevStack``,
which keeps only its outputs for the backward; ``ResidualStack`` in the standard twin),
preceded from the second stage on by an ordinary *transition* that changes resolution or
width (Swin's patch merging, MViT's pooling block). In the reversible modes (``reprop``,
``pareprop``) the fusion and transition are rematerialised (non-reentrant
``torch.utils.checkpoint``, which also replays dropout's RNG): the backward recomputes them
from the previous stack's outputs, which that stack keeps anyway, instead of storing their
activations at the higher resolution. Under ``backprop`` they keep their activations as every
layer does.

A transition takes one tensor, so a reversible model first fuses its two streams (the
"lateral connection" of Mangalam et al., 2022, "Reversible Vision Transformers"); after the
transition both streams of the next stage start from its output::

    (y1, y2) -> fuse -> transition -> x -> (x, x) -> RevStack -> ...

Fusion modes (``FUSIONS``), for streams of width C:

- ``avg``: ``(y1 + y2) / 2`` (width C);
- ``add``: ``y1 + y2`` (width C);
- ``concat``: ``[y1, y2]`` (width 2C: the transition must accept 2C);
- ``concat_mlp``: ``fc2(GELU(fc1([y1, y2])))``, fc1: 2C -> 2C, fc2: 2C -> C (width C), the
  fusion of the Rev-Swin authors' reference code (minREV, ``revswin.py``).

The twin of ``revjax/stages.py``, module for module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import layers
from .core import MODES
from .stack import ResidualStack, RevStack

FUSIONS = ("avg", "add", "concat", "concat_mlp")


def check_fusion(mode: str) -> str:
    if mode not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {mode!r}")
    return mode


def fused_width(mode: str, dim: int) -> int:
    """Width of the fused tensor for two streams of width ``dim``."""
    return 2 * dim if check_fusion(mode) == "concat" else dim


class TwoStreamFusion(nn.Module):
    """Fuses two streams ``(x1, x2)`` of width ``dim`` into one tensor (see ``FUSIONS``)."""

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        self.mode, self.dim = check_fusion(mode), dim
        if mode == "concat_mlp":
            self.fc1 = layers.dense(2 * dim, 2 * dim)
            self.fc2 = layers.dense(2 * dim, dim)

    @property
    def out_dim(self) -> int:
        return fused_width(self.mode, self.dim)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.mode == "avg":
            return (x1 + x2) / 2
        if self.mode == "add":
            return x1 + x2
        x = torch.cat([x1, x2], dim=-1)
        if self.mode == "concat":
            return x
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="none"))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, dim={self.dim}"


def start(x: Tensor, reversible: bool) -> tuple[Tensor, ...]:
    """The streams entering the first stage: ``(x, x)`` (reversible) or ``(x,)``."""
    return (x, x) if reversible else (x,)


def concat(streams: tuple[Tensor, ...]) -> Tensor:
    """The streams leaving the last stage side by side: width 2C (reversible) or C."""
    return torch.cat(streams, dim=-1) if len(streams) > 1 else streams[0]


def _enter(fusion, transition, streams: tuple, kw: dict) -> Tensor:
    """A stage's entry: the fused streams (or the one stream) through the transition."""
    x = fusion(*streams) if fusion is not None else streams[0]
    return transition(x, **kw)


class Stage(nn.Module):
    """One stage: [fusion ->] [transition ->] a reversible (or residual) stack.

    Args:
      make_f, make_g: one layer's halves, as for ``RevStack``.
      depth: layers in the stack.
      reversible: a ``RevStack`` on two streams, or a ``ResidualStack`` on one (the
        standard twin: no fusion).
      mode: the stack's default backward mode (reversible only).
      make_transition: ``make_transition(width)`` builds the non-reversible block run before
        the stack, taking a tensor of width ``width`` (the fused width for a reversible
        stage: ``2 * in_dim`` with ``concat``); None for the first stage.
      in_dim: width of the incoming streams (needed with a transition).
      fusion: one of ``FUSIONS`` (reversible stages with a transition).
      stack_options: ``RevStack``'s numerics keywords (``stream_dtype``, ``anchor_every``).

    Attributes (the parameter paths the converter maps): ``fusion`` (or None),
    ``transition`` (or None), ``blocks`` (``RevStack`` / ``ResidualStack``).
    """

    def __init__(
        self,
        make_f: Callable[[], nn.Module],
        make_g: Callable[[], nn.Module],
        *,
        depth: int,
        reversible: bool = True,
        mode: str = "reprop",
        make_transition: Callable[[int], nn.Module] | None = None,
        in_dim: int | None = None,
        fusion: str = "avg",
        stack_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.reversible = reversible
        fuse = transition = None
        if make_transition is not None:
            if in_dim is None:
                raise ValueError("a stage with a transition needs in_dim (the streams' width)")
            width = in_dim
            if reversible:
                fuse = TwoStreamFusion(fusion, in_dim)
                width = fuse.out_dim
            transition = make_transition(width)
        self.fusion, self.transition = fuse, transition
        if reversible:
            self.blocks = RevStack(make_f, make_g, depth=depth, mode=mode,
                                   **(stack_options or {}))
        else:
            self.blocks = ResidualStack(make_f, make_g, depth=depth)

    def forward(
        self,
        streams: tuple[Tensor, ...],
        *shared: Tensor,
        per_layer: Mapping[str, Tensor] | None = None,
        mode: str | None = None,
        transition_kw: Mapping[str, object] | None = None,
    ) -> tuple[Tensor, ...]:
        """``streams``: ``(x1, x2)`` (reversible) or ``(x,)``; returns the stage's streams.

        ``shared`` and ``per_layer`` go to the stack (detached); ``mode`` overrides the
        stack's backward mode (reversible stages only); ``transition_kw`` are keyword
        arguments of the transition (MViT's: its dropout key and drop-path rate).
        """
        want = 2 if self.reversible else 1
        if len(streams) != want:
            kind = "reversible" if self.reversible else "standard"
            raise ValueError(f"a {kind} stage takes {want} stream(s), got {len(streams)}")
        if self.transition is not None:
            kw = dict(transition_kw or {})
            if self.reversible and (mode or self.blocks.mode) != "backprop" \
                    and torch.is_grad_enabled():
                # Rematerialised: its input is the previous stack's output, which that
                # stack's backward keeps anyway; only what it computes would be stored.
                x = checkpoint(_enter, self.fusion, self.transition, streams, kw,
                               use_reentrant=False)
            else:
                x = _enter(self.fusion, self.transition, streams, kw)
            streams = start(x, self.reversible)
        if self.reversible:
            return self.blocks(*streams, *shared, per_layer=per_layer, mode=mode)
        if mode not in (None, "backprop"):
            raise ValueError(
                f"a standard stage runs mode='backprop' only, got {mode!r}; modes: {MODES}"
            )
        return (self.blocks(streams[0], *shared, per_layer=per_layer),)
