"""revjax: reversible transformers with Reprop and PaReprop backward for JAX / Flax NNX.

Public API: ``MODES``, ``DEFAULT_MODE`` (``reprop``: the mode models and stacks run when
none is given), ``reversible`` (the pure-JAX core), ``invert``, ``RevStack``,
``ResidualStack`` (the standard twin; ``set_remat`` / ``REMAT_POLICIES``: its per-layer
rematerialisation baseline), ``models`` (registry: ``build``, ``names``),
``CPU_COMPILER_OPTIONS`` (XLA:CPU options for programs using pareprop). Numerics:
``reversible``/``RevStack`` options ``stream_dtype`` and ``anchor_every``, the rebuild check
``check_rebuild`` / ``rebuild_errors`` / ``check_rebuilds`` (a block checking every stack
call of a model) raising ``RebuildError``.
"""

from . import models
from .core import DEFAULT_MODE, MODES, invert, reversible
from .rebuild import RebuildError, check_rebuild, rebuild_errors
from .streams import CPU_COMPILER_OPTIONS
from .stack import REMAT_POLICIES, ResidualStack, RevStack, check_rebuilds, set_remat

__version__ = "0.1.0"

__all__ = ["CPU_COMPILER_OPTIONS", "DEFAULT_MODE", "MODES", "REMAT_POLICIES", "RebuildError",
           "ResidualStack", "RevStack", "check_rebuild", "check_rebuilds", "invert", "models",
           "rebuild_errors", "reversible", "set_remat", "__version__"]
