"""revjax: reversible transformers with Reprop and PaReprop backward for JAX / Flax NNX.

Public API: ``MODES``, ``reversible`` (the pure-JAX core), ``invert``, ``RevStack``.
"""

from .core import MODES, invert, reversible
from .stack import RevStack

__version__ = "0.1.0"

__all__ = ["MODES", "RevStack", "invert", "reversible", "__version__"]
