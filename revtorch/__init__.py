"""revtorch: reversible transformers in PyTorch, trained with backprop, Reprop or PaReprop.

The PyTorch twin of ``revjax`` (see CONVENTIONS.md). Public API:

- ``MODES``: ``("backprop", "reprop", "pareprop")``.
- ``reversible(fs, gs, x1, x2, shared=(), per_layer=None, *, mode)``: the functional core.
- ``RevStack(make_f, make_g, *, depth, mode="pareprop")``: the same as an ``nn.Module``.
"""

from revtorch.core import MODES, reversible
from revtorch.stack import RevStack

__version__ = "0.1.0"

__all__ = ["MODES", "RevStack", "reversible", "__version__"]
