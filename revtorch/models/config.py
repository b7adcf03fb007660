"""Helpers every model family shares: config overrides and the mode switch."""

from __future__ import annotations

import dataclasses

from ..core import MODES


def with_overrides(config, overrides: dict):
    """``config`` with ``overrides`` applied; unknown keys name the allowed ones."""
    fields = {f.name for f in dataclasses.fields(config)} - {"name", "reversible"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(
            f"unknown override(s) {sorted(unknown)} for {config.name}; allowed: {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def resolve_mode(config, mode: str | None) -> str:
    """The backward mode for a call: reversible models take any of ``MODES`` (default
    ``pareprop``); standard twins only ``backprop``."""
    if mode is None:
        return "pareprop" if config.reversible else "backprop"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not config.reversible and mode != "backprop":
        raise ValueError(
            f"{config.name} is a standard (non-reversible) model: it supports "
            f"mode='backprop' only, got {mode!r}; use rev-{config.name}"
        )
    return mode
