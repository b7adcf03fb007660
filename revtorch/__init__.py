"""revtorch: reversible transformers in PyTorch, trained with backprop, Reprop or PaReprop.

The PyTorch twin of ``revjax`` (see docs/conventions.md). Public API:

- ``MODES``: ``("backprop", "reprop", "pareprop")``; ``DEFAULT_MODE``: ``"reprop"``, the mode
  models and stacks run when none is given.
- ``reversible(fs, gs, x1, x2, shared=(), per_layer=None, *, mode)``: the functional core.
- ``RevStack(make_f, make_g, *, depth, mode=DEFAULT_MODE)``: the same as an ``nn.Module``.
- ``ResidualStack(make_f, make_g, *, depth, remat=None)``: the standard (non-reversible) twin;
  ``set_remat(model, policy)`` (``REMAT_POLICIES``) turns on its per-layer rematerialisation.
- Numerics: ``stream_dtype`` / ``anchor_every`` options of ``reversible`` and ``RevStack``;
  ``check_rebuild``, ``rebuild_errors`` and ``check_rebuilds`` (a block checking every stack
  call of a model), raising ``RebuildError``.
- ``models``: the registry (``build(name, *, mode=None, **overrides)``, ``names()``).
"""

from revtorch import models
from revtorch.core import DEFAULT_MODE, MODES, reversible
from revtorch.rebuild import RebuildError, check_rebuild, rebuild_errors
from revtorch.stack import REMAT_POLICIES, ResidualStack, RevStack, check_rebuilds, set_remat

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODE", "MODES", "REMAT_POLICIES", "RebuildError", "ResidualStack", "RevStack",
           "check_rebuild", "check_rebuilds", "models", "rebuild_errors", "reversible",
           "set_remat", "__version__"]
