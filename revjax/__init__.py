"""revjax: reversible transformers with Reprop and PaReprop backward for JAX / Flax NNX.

Public API: ``MODES``, ``reversible`` (the pure-JAX core), ``invert``, ``RevStack``,
``ResidualStack`` (the standard twin), ``models`` (registry: ``build``, ``names``).
"""

from . import models
from .core import MODES, invert, reversible
from .stack import ResidualStack, RevStack

__version__ = "0.1.0"

__all__ = ["MODES", "ResidualStack", "RevStack", "invert", "models", "reversible",
           "__version__"]
