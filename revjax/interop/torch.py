"""Weights between a revjax model and its revtorch twin: ``from_torch`` and ``to_torch``.

One mapping table per model family, keyed by the family's config class (``TABLES``). A row
``Row(jax, torch, kind)`` maps one module (or, for ``kind="param"``, one parameter) of the
NNX model to its torch ``state_dict`` prefix (or key):

- ``kind`` names the module type and so its leaves and their layouts (``KINDS``): ``linear``
  (Flax ``kernel`` (in, out) = torch ``weight`` (out, in) transposed, ``bias``), ``conv``
  (``kernel`` (*spatial, in, out) = ``weight`` (out, in, *spatial)), ``norm`` (``scale`` =
  ``weight``), ``embed`` (``embedding`` = ``weight``), ``param`` (the array itself, as is).
  A leaf the NNX module lacks (a dense layer without bias) is not expected from torch either.
- ``{i}`` in the torch pattern marks a stacked stage: the NNX leaves carry the stage's layers
  on a leading depth axis, torch keeps one entry per layer (``blocks.f.{i}.attn.qkv``). The
  depth is read from the NNX model, so each stage of a hierarchical model has its own.
- ``{name}`` in the jax pattern matches any one path component and is substituted into the
  torch pattern: ``Row("stages.{s}.blocks.f.norm", "stages.{s}.blocks.f.{i}.norm", "norm")``
  covers every stage; transition blocks between stages are plain (unstacked) rows.

Tied weights: a parameter used twice (RoBERTa's MLM decoder reuses the token embedding) is
one ``nnx.Param`` in NNX and one ``nn.Parameter`` in torch, so it has one row and one key.
A torch model that also registers the tied tensor under a second name (a decoder module
holding the embedding's weight: ``state_dict`` then lists both keys, ``named_parameters``
only the first) declares the alias: ``register_table(cls, rows, tied={alias: source})``.
``to_torch`` then writes the alias as the very tensor of its source (shared, as torch's
``state_dict`` does); ``from_torch`` accepts a state_dict with or without the alias (a
gradient dict from ``named_parameters`` lacks it) and refuses one whose alias differs.

Only ``nnx.Param`` leaves are converted. ``from_torch`` casts to the NNX parameters' dtypes
(as ``load_state_dict`` casts to the torch parameters'), so a round trip between models of
the same dtype is exact, float64 included (build the NNX model under ``jax.enable_x64``).
Torch is imported inside the functions: importing this module does not need it.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.mvit import MViTConfig
from ..models.roberta import RobertaConfig
from ..models.swin import SwinConfig
from ..models.vit import ViTConfig

__all__ = ["KINDS", "Row", "TABLES", "TIED", "WeightMismatchError", "from_torch", "register_table",
           "state_from_torch", "to_torch"]


# ---------------------------------------------------------------------------------------------
# Layouts of one layer's array: (NNX -> torch, torch -> NNX), both exact (axis permutations).


def _conv_to_torch(a: np.ndarray) -> np.ndarray:
    n = a.ndim  # (*spatial, in, out) -> (out, in, *spatial)
    return np.transpose(a, (n - 1, n - 2, *range(n - 2)))


def _conv_from_torch(a: np.ndarray) -> np.ndarray:
    n = a.ndim  # (out, in, *spatial) -> (*spatial, in, out)
    return np.transpose(a, (*range(2, n), 1, 0))


LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda a: a, lambda a: a),
    "transpose": (lambda a: a.T, lambda a: a.T),
    "conv": (_conv_to_torch, _conv_from_torch),
}

# kind -> ((NNX leaf name, torch leaf name, layout), ...); None: the row names the leaf itself.
KINDS: dict[str, tuple[tuple[str | None, str | None, str], ...]] = {
    "linear": (("kernel", "weight", "transpose"), ("bias", "bias", "same")),
    "conv": (("kernel", "weight", "conv"), ("bias", "bias", "same")),
    "norm": (("scale", "weight", "same"), ("bias", "bias", "same")),
    "embed": (("embedding", "weight", "same"),),
    "param": ((None, None, "same"),),
}

_FIELD = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One module (or parameter) of a family: NNX path pattern, torch key pattern, kind."""

    jax: str
    torch: str
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r} in {self}; known: {sorted(KINDS)}")
        bound = set(_FIELD.findall(self.jax))
        if "i" in bound:
            raise ValueError(f"{{i}} (the layer index) belongs in the torch pattern: {self}")
        unbound = set(_FIELD.findall(self.torch)) - bound - {"i"}
        if unbound:
            raise ValueError(f"torch pattern fields {sorted(unbound)} are not in the jax "
                             f"pattern: {self}")

    def match(self, path: tuple[str, ...]) -> dict[str, str] | None:
        """The placeholder bindings if ``path`` (a module or leaf path) matches, else None."""
        parts = self.jax.split(".")
        if len(parts) != len(path):
            return None
        bindings = {}
        for pat, comp in zip(parts, path):
            field = _FIELD.fullmatch(pat)
            if field:
                bindings[field.group(1)] = comp
            elif pat != comp:
                return None
        return bindings


TABLES: dict[type, tuple[Row, ...]] = {}
# config class -> {torch alias key: torch source key} (tied weights registered twice in torch).
TIED: dict[type, dict[str, str]] = {}


def register_table(config_cls: type, rows, *, tied: Mapping[str, str] | None = None) -> None:
    """Register the mapping table of the family whose models carry ``config_cls`` configs;
    ``tied`` maps torch keys that alias another key's tensor to that key (see above)."""
    if config_cls in TABLES:
        raise ValueError(f"a table for {config_cls.__name__} is already registered")
    TABLES[config_cls] = tuple(rows)
    TIED.pop(config_cls, None)
    if tied:
        TIED[config_cls] = dict(tied)


# Rev-ViT and ViT: the reversible and the residual encoder both keep F and G in ``blocks.f``
# and ``blocks.g`` (stacked in revjax, ModuleLists in revtorch).
register_table(ViTConfig, (
    Row("pos_embed", "pos_embed", "param"),
    Row("patch_embed.proj", "patch_embed.proj", "conv"),
    Row("blocks.f.norm", "blocks.f.{i}.norm", "norm"),
    Row("blocks.f.attn.qkv", "blocks.f.{i}.attn.qkv", "linear"),
    Row("blocks.f.attn.proj", "blocks.f.{i}.attn.proj", "linear"),
    Row("blocks.g.norm", "blocks.g.{i}.norm", "norm"),
    Row("blocks.g.mlp.fc1", "blocks.g.{i}.mlp.fc1", "linear"),
    Row("blocks.g.mlp.fc2", "blocks.g.{i}.mlp.fc2", "linear"),
    Row("norm", "norm", "norm"),
    Row("head", "head", "linear"),
))


# Rev-RoBERTa and RoBERTa: the same layout as ViT for the encoder; the MLM decoder is the
# token embedding itself (``embed.attend`` in revjax, ``F.linear(h, tok_embed.weight)`` in
# revtorch), so it has no key of its own, only ``head.bias``.
register_table(RobertaConfig, (
    Row("tok_embed", "tok_embed", "embed"),
    Row("pos_embed", "pos_embed", "embed"),
    Row("embed_norm", "embed_norm", "norm"),
    Row("blocks.f.norm", "blocks.f.{i}.norm", "norm"),
    Row("blocks.f.attn.qkv", "blocks.f.{i}.attn.qkv", "linear"),
    Row("blocks.f.attn.proj", "blocks.f.{i}.attn.proj", "linear"),
    Row("blocks.g.norm", "blocks.g.{i}.norm", "norm"),
    Row("blocks.g.mlp.fc1", "blocks.g.{i}.mlp.fc1", "linear"),
    Row("blocks.g.mlp.fc2", "blocks.g.{i}.mlp.fc2", "linear"),
    Row("norm", "norm", "norm"),
    Row("head.bias", "head.bias", "param"),
    Row("head.dense", "head.dense", "linear"),
    Row("head.norm", "head.norm", "norm"),
))


# Rev-Swin and Swin: hierarchical, so every row is per stage (``{s}``), each stage stacked at
# its own depth. A stage holds an optional two-stream fusion (reversible stages after the
# first; ``concat_mlp`` has ``fc1``/``fc2``, the other fusions no parameters), an optional
# patch-merging transition (its reduction has no bias) and the F/G stack. The relative
# position bias table ((2M-1)^2, heads) is a plain parameter per layer; the relative
# position index and the shift masks are buffers (non-persistent in torch), not mapped.
register_table(SwinConfig, (
    Row("patch_embed.proj", "patch_embed.proj", "conv"),
    Row("patch_embed.norm", "patch_embed.norm", "norm"),
    Row("stages.{s}.fusion.{fc}", "stages.{s}.fusion.{fc}", "linear"),
    Row("stages.{s}.transition.norm", "stages.{s}.transition.norm", "norm"),
    Row("stages.{s}.transition.reduction", "stages.{s}.transition.reduction", "linear"),
    Row("stages.{s}.blocks.f.norm", "stages.{s}.blocks.f.{i}.norm", "norm"),
    Row("stages.{s}.blocks.f.attn.relative_position_bias_table",
        "stages.{s}.blocks.f.{i}.attn.relative_position_bias_table", "param"),
    Row("stages.{s}.blocks.f.attn.qkv", "stages.{s}.blocks.f.{i}.attn.qkv", "linear"),
    Row("stages.{s}.blocks.f.attn.proj", "stages.{s}.blocks.f.{i}.attn.proj", "linear"),
    Row("stages.{s}.blocks.g.norm", "stages.{s}.blocks.g.{i}.norm", "norm"),
    Row("stages.{s}.blocks.g.mlp.{fc}", "stages.{s}.blocks.g.{i}.mlp.{fc}", "linear"),
    Row("norm", "norm", "norm"),
    Row("head", "head", "linear"),
))



def _pooling_attention_rows(jax: str, torch: str) -> list[Row]:
    """MViT's pooling attention at ``jax`` / ``torch``: projections, the depthwise pooling
    convolutions (no bias) and their LayerNorms, the two relative position tables."""
    rows = [Row(f"{jax}.{m}", f"{torch}.{m}", "linear") for m in ("qkv", "proj")]
    for x in "qkv":
        rows += [Row(f"{jax}.pool_{x}", f"{torch}.pool_{x}", "conv"),
                 Row(f"{jax}.norm_{x}", f"{torch}.norm_{x}", "norm")]
    return rows + [Row(f"{jax}.rel_pos_{a}", f"{torch}.rel_pos_{a}", "param") for a in "hw"]


# MViT: stage i >= 1 has its fusion (reversible; ``concat_mlp`` only has parameters) and its
# transition block (plain rows), every stage a stacked F/G. The relative position indices are
# constants (non-persistent buffers in torch), not mapped.
register_table(MViTConfig, (
    Row("patch_embed.proj", "patch_embed.proj", "conv"),
    Row("stages.{s}.fusion.{fc}", "stages.{s}.fusion.{fc}", "linear"),
    Row("stages.{s}.transition.norm1", "stages.{s}.transition.norm1", "norm"),
    *_pooling_attention_rows("stages.{s}.transition.attn", "stages.{s}.transition.attn"),
    Row("stages.{s}.transition.shortcut_proj", "stages.{s}.transition.shortcut_proj",
        "linear"),
    Row("stages.{s}.transition.norm2", "stages.{s}.transition.norm2", "norm"),
    Row("stages.{s}.transition.mlp.{fc}", "stages.{s}.transition.mlp.{fc}", "linear"),
    Row("stages.{s}.blocks.f.norm", "stages.{s}.blocks.f.{i}.norm", "norm"),
    *_pooling_attention_rows("stages.{s}.blocks.f.attn", "stages.{s}.blocks.f.{i}.attn"),
    Row("stages.{s}.blocks.g.norm", "stages.{s}.blocks.g.{i}.norm", "norm"),
    Row("stages.{s}.blocks.g.mlp.{fc}", "stages.{s}.blocks.g.{i}.mlp.{fc}", "linear"),
    Row("norm", "norm", "norm"),
    Row("head", "head", "linear"),
))


class WeightMismatchError(ValueError):
    """A state_dict that does not fit the model: every missing, unexpected and mis-shaped key.

    ``missing`` and ``unexpected`` are lists of torch keys; ``mis_shaped`` is a list of
    ``(key, expected shape, got shape)``.
    """

    def __init__(self, model_name: str, missing: list[str], unexpected: list[str],
                 mis_shaped: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        lines = [f"the state_dict does not fit {model_name}:"]
        lines.append(f"  missing ({len(missing)}): {', '.join(missing) or '-'}")
        lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected) or '-'}")
        lines.append(f"  mis-shaped ({len(mis_shaped)}): " + (", ".join(
            f"{k} (expected {list(want)}, got {list(got)})" for k, want, got in mis_shaped)
            or "-"))
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The plan: every NNX parameter with its torch key(s) and layout, derived from the table.


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple  # the NNX parameter's path (as nnx.to_flat_state gives it)
    key: str  # torch key, with "{i}" left in when stacked
    layout: str
    shape: tuple  # the NNX array's shape
    dtype: Any

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def keys(self) -> list[str]:
        """The torch keys, one per layer when stacked."""
        if not self.stacked:
            return [self.key]
        return [self.key.replace("{i}", str(i)) for i in range(self.shape[0])]

    def torch_shape(self) -> tuple:
        """One torch entry's shape (per layer when stacked)."""
        layer = self.shape[1:] if self.stacked else self.shape
        return LAYOUTS[self.layout][0](np.broadcast_to(np.uint8(0), layer)).shape  # no copy


def _name(model) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} ({getattr(config, 'name', '?')})"


def _plan(model: nnx.Module) -> tuple[list[_Entry], nnx.FlatState]:
    config_cls = type(getattr(model, "config", None))
    if config_cls not in TABLES:
        raise TypeError(f"no conversion table for {_name(model)} (config "
                        f"{config_cls.__name__}); tables exist for "
                        f"{sorted(c.__name__ for c in TABLES)}")
    rows = TABLES[config_cls]
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    entries, uncovered, ambiguous = [], [], []
    for path, var in flat:
        parts = tuple(str(p) for p in path)
        found = []
        for r, row in enumerate(rows):
            for j, (leaf, torch_leaf, layout) in enumerate(KINDS[row.kind]):
                module = parts if leaf is None else parts[:-1]
                if leaf is not None and parts[-1] != leaf:
                    continue
                bindings = row.match(module)
                if bindings is None:
                    continue
                key = _FIELD.sub(lambda m: "{i}" if m.group(1) == "i" else bindings[m.group(1)],
                                 row.torch)
                found.append(((r, j), key if torch_leaf is None else f"{key}.{torch_leaf}",
                              layout))
        if not found:
            uncovered.append(".".join(parts))
        elif len(found) > 1:
            ambiguous.append(".".join(parts))
        else:
            order, key, layout = found[0]
            value = var.get_value()
            entries.append((order, _Entry(tuple(path), key, layout, tuple(value.shape),
                                          value.dtype)))
    if uncovered or ambiguous:
        raise ValueError(f"the {config_cls.__name__} table does not fit {_name(model)}: "
                         f"no row for {uncovered}, several rows for {ambiguous}")
    entries = [e for _, e in sorted(entries, key=lambda oe: oe[0])]  # table order
    counts = collections.Counter(k for e in entries for k in e.keys())
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise ValueError(f"the {config_cls.__name__} table maps several parameters to {twice}")
    tied = TIED.get(config_cls, {})
    bad = sorted(a for a, src in tied.items() if a in counts or src not in counts)
    if bad:
        raise ValueError(f"the {config_cls.__name__} tied aliases {bad} must name keys the "
                         f"table does not map, aliasing keys it does")
    return entries, flat


def _tied(model) -> dict[str, str]:
    return TIED.get(type(getattr(model, "config", None)), {})


# ---------------------------------------------------------------------------------------------
# numpy <-> torch, dtype for dtype (bfloat16 and float8 through a same-width integer view).


def _tensor(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.kind in "biufc" and a.dtype.type.__module__ == "numpy":
        return torch.from_numpy(a.copy())
    ints = {1: np.int8, 2: np.int16, 4: np.int32}[a.dtype.itemsize]
    return torch.from_numpy(a.view(ints).copy()).view(getattr(torch, a.dtype.name))


def _array(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
        ints = {1: torch.int8, 2: torch.int16}[t.element_size()]
        return t.view(ints).numpy().view(jnp.dtype(str(t.dtype).split(".")[-1]))
    return t.numpy()


# ---------------------------------------------------------------------------------------------
# The two directions.


def to_torch(jax_model: nnx.Module) -> dict:
    """The model's parameters as a revtorch ``state_dict`` (a dict of CPU torch tensors, in
    the NNX parameters' dtypes), ready for ``load_state_dict``."""
    entries, flat = _plan(jax_model)
    values = {tuple(p): v.get_value() for p, v in flat}
    out = {}
    # Consecutive rows of one stacked stage are written layer after layer, as torch orders
    # a ModuleList (blocks.f.0.norm, blocks.f.0.attn..., blocks.f.1.norm, ...).
    stage = lambda e: e.key.split("{i}")[0] if e.stacked else id(e)  # noqa: E731
    for _, group in itertools.groupby(entries, key=stage):
        group = [(e, np.asarray(jax.device_get(values[e.path]))) for e in group]
        for i in range(group[0][0].shape[0] if group[0][0].stacked else 1):
            for e, a in group:
                layer = a[i] if e.stacked else a
                out[e.keys()[i]] = _tensor(LAYOUTS[e.layout][0](layer))
    for alias, source in _tied(jax_model).items():
        out[alias] = out[source]  # the same tensor, as torch's state_dict holds it
    return out


def state_from_torch(jax_model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.State:
    """The ``nnx.Param`` state that ``from_torch`` would load, without loading it: the torch
    tensors mapped, stacked and transposed to the model's layout and cast to its dtypes.
    Also converts gradients (a dict of ``.grad`` keyed as the state_dict).

    Raises ``WeightMismatchError`` listing every missing, unexpected and mis-shaped key.
    """
    entries, flat = _plan(jax_model)
    tied = _tied(jax_model)
    expected = {k for e in entries for k in e.keys()}
    missing = [k for e in entries for k in e.keys() if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in tied]
    mis_shaped = []
    shapes = {}
    for e in entries:
        want = e.torch_shape()
        shapes.update(dict.fromkeys(e.keys(), want))
        mis_shaped += [(k, want, tuple(state_dict[k].shape)) for k in e.keys()
                       if k in state_dict and tuple(state_dict[k].shape) != want]
    mis_shaped += [(a, shapes[src], tuple(state_dict[a].shape)) for a, src in tied.items()
                   if a in state_dict and tuple(state_dict[a].shape) != shapes[src]]
    if missing or unexpected or mis_shaped:
        raise WeightMismatchError(_name(jax_model), missing, unexpected, mis_shaped)
    import torch

    untied = [a for a, src in tied.items() if a in state_dict and not torch.equal(
        torch.as_tensor(state_dict[a]), torch.as_tensor(state_dict[src]))]
    if untied:
        raise ValueError(f"the state_dict does not fit {_name(jax_model)}: the tied keys "
                         f"{untied} differ from {[tied[a] for a in untied]}")
    new = {}
    for e in entries:
        layers = [LAYOUTS[e.layout][1](_array(state_dict[k])) for k in e.keys()]
        a = np.stack(layers) if e.stacked else layers[0]
        new[e.path] = np.asarray(a, dtype=e.dtype)
    out = []
    for path, var in flat:
        old = var.get_value()
        value = jax.device_put(new[tuple(path)], getattr(old, "sharding", None))
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def from_torch(jax_model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Load a revtorch ``state_dict`` into ``jax_model`` in place and return the model.

    Every parameter must be present with the right shape, and nothing else: otherwise one
    ``WeightMismatchError`` lists all missing, unexpected and mis-shaped keys and the model
    is left unchanged. Values are cast to the model's parameter dtypes.
    """
    nnx.update(jax_model, state_from_torch(jax_model, state_dict))
    return jax_model
