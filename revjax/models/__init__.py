"""Models: ``build(name, *, rngs, mode=None, **overrides)`` and ``names()``.

The registry lives in ``registry``; importing each family module registers its
``rev-<family>-<variant>`` and ``<family>-<variant>`` rows.
"""

from . import mvit, roberta, swin, vit  # noqa: F401  (each registers its family)
from .registry import build, names, register, register_family

__all__ = ["build", "names", "register", "register_family"]
