"""Helpers every model family shares: config overrides and the mode switch."""

from __future__ import annotations

import dataclasses

from ..core import DEFAULT_MODE, MODES


def with_overrides(config, overrides: dict):
    """``config`` with ``overrides`` applied; unknown keys name the allowed ones."""
    fields = {f.name for f in dataclasses.fields(config)} - {"name", "reversible"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)} for {config.name}; "
                        f"allowed: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def resolve_mode(config, mode: str | None) -> str:
    """The backward mode for a call: reversible models take any of ``MODES`` (default
    ``DEFAULT_MODE``: reprop); standard twins only ``backprop``."""
    if mode is None:
        return DEFAULT_MODE if config.reversible else "backprop"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not config.reversible and mode != "backprop":
        raise ValueError(f"{config.name} is a standard (non-reversible) model: it supports "
                         f"mode='backprop' only, got {mode!r}; use rev-{config.name}")
    return mode


def stack_options(config) -> dict:
    """The reversible stacks' numerics keywords from ``config``: ``stream_dtype`` (the
    precision policy: None keeps the streams in the compute dtype; e.g. ``"float32"`` holds
    them, and the inverse's subtractions, in float32 while F and G compute in ``dtype``) and
    ``anchor_every`` (None, or k: exact streams stored every k layers, where the backward's
    rebuild restarts). Both go to every ``RevStack``; a standard twin refuses them."""
    options = {"stream_dtype": config.stream_dtype, "anchor_every": config.anchor_every}
    if config.reversible:
        return options
    set_ = sorted(k for k, v in options.items() if v is not None)
    if set_:
        raise ValueError(f"{set_} apply to reversible models only (their two streams and "
                         f"rebuild); {config.name} is a standard model: use rev-{config.name}")
    return {}
