"""Model registry: ``build(name, *, rngs, mode=None, **overrides)`` and ``names()``.

Names are ``rev-<family>-<variant>`` (reversible) and ``<family>-<variant>`` (the standard
twin); each family module imports ``register_family`` from here and registers its rows with it
(importing this module, not the package, keeps the import graph free of cycles).
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from .config import with_overrides

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str, builder: Callable[..., nnx.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder


def register_family(family: str, config_cls, model_cls, variants: dict) -> None:
    """Register ``rev-<family>-<variant>`` and ``<family>-<variant>`` for each row of
    ``variants``: the variant's config with overrides applied, built as ``model_cls``."""
    def builder(name: str, reversible: bool, row: dict):
        def build(*, rngs: nnx.Rngs, mode: str | None = None, **overrides):
            config = with_overrides(config_cls(name=name, reversible=reversible, **row),
                                    overrides)
            return model_cls(config, rngs=rngs, mode=mode)

        return build

    for variant, row in variants.items():
        register(f"rev-{family}-{variant}", builder(f"rev-{family}-{variant}", True, row))
        register(f"{family}-{variant}", builder(f"{family}-{variant}", False, row))


def names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, *, rngs: nnx.Rngs, mode: str | None = None, **overrides) -> nnx.Module:
    """Build a registered model.

    ``mode`` is the default backward mode (``revjax.MODES``); ``None`` means
    ``revjax.DEFAULT_MODE`` (``reprop``) for reversible models and ``backprop`` for standard
    twins, which accept nothing else; pass ``mode="pareprop"`` for PaReprop by default.
    ``overrides`` replace fields of the variant's config (``depth``, ``dim``, ``heads``,
    ``mlp_ratio``, ``num_classes``, ``img_size``, ``patch_size``, ``dtype``, ``param_dtype``,
    ``drop_rate``, ``drop_path_rate``, ...); unknown keys are an error.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](rngs=rngs, mode=mode, **overrides)
