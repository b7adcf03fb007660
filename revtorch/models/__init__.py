"""Model registry: ``build(name, *, mode=None, **overrides)`` and ``names()``.

Names are ``rev-<family>-<variant>`` (reversible) and ``<family>-<variant>`` (the standard
twin); each family file registers its rows with ``register_family``. The twin of
``revjax.models``: same names, same config fields, same parameter counts.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder


def register_family(family: str, config_cls, model_cls, variants: dict) -> None:
    """Register ``rev-<family>-<variant>`` and ``<family>-<variant>`` for each row of
    ``variants``: the variant's config with overrides applied, built as ``model_cls``."""
    from .config import with_overrides

    def builder(name: str, reversible: bool, row: dict):
        def build(*, mode: str | None = None, **overrides):
            config = with_overrides(config_cls(name=name, reversible=reversible, **row),
                                    overrides)
            return model_cls(config, mode=mode)

        return build

    for variant, row in variants.items():
        register(f"rev-{family}-{variant}", builder(f"rev-{family}-{variant}", True, row))
        register(f"{family}-{variant}", builder(f"{family}-{variant}", False, row))


def names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, *, mode: str | None = None, **overrides) -> nn.Module:
    """Build a registered model.

    ``mode`` is the default backward mode (``revtorch.MODES``); ``None`` means ``pareprop``
    for reversible models and ``backprop`` for standard twins, which accept nothing else.
    ``overrides`` replace fields of the variant's config (``depth``, ``dim``, ``heads``,
    ``mlp_ratio``, ``num_classes``, ``img_size``, ``patch_size``, ``dtype``, ``param_dtype``,
    ``drop_rate``, ``drop_path_rate``, ...); unknown keys are an error. Build under
    ``with torch.device("meta"):`` to inspect a large model without allocating it.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](mode=mode, **overrides)


from . import vit  # noqa: E402,F401  (registers the ViT family)
from . import swin  # noqa: E402,F401  (registers the Swin family)
from . import roberta  # noqa: E402,F401  (registers the RoBERTa family)
from . import mvit  # noqa: E402,F401  (registers the MViT family)

__all__ = ["build", "names", "register", "register_family"]
