"""RevStack: a stack of reversible layers as an ``nn.Module``, the mode a switch on the call;
ResidualStack: its standard (non-reversible) twin."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from revtorch.core import MODES, _slice, reversible


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

    The layers live in ``self.f`` and ``self.g`` (``nn.ModuleList``, one entry per layer).
    """

    def __init__(
        self,
        make_f: Callable[[], nn.Module],
        make_g: Callable[[], nn.Module],
        *,
        depth: int,
        mode: str = "pareprop",
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int, got {type(depth).__name__}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.mode = _check_mode(mode)
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
        return reversible(self.f, self.g, x1, x2, shared, per_layer, mode=mode)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, mode={self.mode!r}"


class ResidualStack(nn.Module):
    """The standard (non-reversible) twin of ``RevStack``: ``x = x + F_i(x); x = x + G_i(x)``
    per layer on one stream, with the same F and G, under plain autograd (backprop only).

    Args and layout as ``RevStack`` (``self.f``, ``self.g``), without ``mode``. Called
    ``stack(x, *shared, per_layer=None)``; ``shared`` and ``per_layer`` are detached.
    """

    def __init__(
        self,
        make_f: Callable[[], nn.Module],
        make_g: Callable[[], nn.Module],
        *,
        depth: int,
    ) -> None:
        super().__init__()
        self.f, self.g = _layers(make_f, make_g, depth)

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
        for i, (f, g) in enumerate(zip(self.f, self.g)):
            kw = _slice(per_layer, i)
            x = x + f(x, *shared, **kw)
            x = x + g(x, *shared, **kw)
        return x

    def extra_repr(self) -> str:
        return f"depth={self.depth}"


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
