"""revjax: reversible transformers with Reprop and PaReprop backward for JAX / Flax NNX.

Public API: ``MODES``, ``reversible`` (the pure-JAX core), ``invert``, ``RevStack``,
``ResidualStack`` (the standard twin), ``models`` (registry: ``build``, ``names``),
``CPU_COMPILER_OPTIONS`` (XLA:CPU options for programs using pareprop).
"""

from . import models
from .core import CPU_COMPILER_OPTIONS, MODES, invert, reversible
from .stack import ResidualStack, RevStack

__version__ = "0.1.0"

__all__ = ["CPU_COMPILER_OPTIONS", "MODES", "ResidualStack", "RevStack", "invert", "models",
           "reversible", "__version__"]
