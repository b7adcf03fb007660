"""revtorch: reversible transformers in PyTorch, trained with backprop, Reprop or PaReprop.

The PyTorch twin of ``revjax`` (see CONVENTIONS.md). Public API:

- ``MODES``: ``("backprop", "reprop", "pareprop")``.
- ``reversible(fs, gs, x1, x2, shared=(), per_layer=None, *, mode)``: the functional core.
- ``RevStack(make_f, make_g, *, depth, mode="pareprop")``: the same as an ``nn.Module``.
- ``ResidualStack(make_f, make_g, *, depth)``: the standard (non-reversible) twin.
- ``models``: the registry (``build(name, *, mode=None, **overrides)``, ``names()``).
"""

from revtorch import models
from revtorch.core import MODES, reversible
from revtorch.stack import ResidualStack, RevStack

__version__ = "0.1.0"

__all__ = ["MODES", "ResidualStack", "RevStack", "models", "reversible", "__version__"]
