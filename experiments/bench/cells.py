"""One measurement's config (a cell): the model, method, batch, depth, size and dtype it runs,
and the checks that refuse a cell that cannot run."""

from __future__ import annotations

import dataclasses

METHODS = ("standard", "remat", "remat-dots", "rev-backprop", "reprop", "pareprop")
GPU_METHODS = METHODS + ("pareprop+streams",)
# the methods in the order the tables and plots show them
ORDER = GPU_METHODS
REMAT = {"remat": "nothing_saveable", "remat-dots": "dots_with_no_batch_dims_saveable"}
BACKENDS = {"jax": ("cpu", "gpu-compile", "gpu"), "torch": ("cpu", "gpu")}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement's config; ``key`` identifies it in the results file."""

    kind: str  # "memory" | "speed"
    framework: str  # "jax" | "torch"
    backend: str  # "cpu" | "gpu-compile" | "gpu"
    model: str  # family variant, e.g. "vit-b"
    method: str
    batch: int
    depth: int | None = None  # None: the variant's own
    size: int = 224  # image size, or sequence length for text models
    dtype: str = "float32"

    @property
    def key(self) -> str:
        return "|".join(str(v) for v in dataclasses.astuple(self))

    @property
    def text(self) -> bool:
        return is_text(self.model)

    def name(self) -> str:
        """The registry name of the model this method runs."""
        return self.model if self.method in ("standard", *REMAT) else f"rev-{self.model}"

    def mode(self) -> str:
        return {"rev-backprop": "backprop", "pareprop+streams": "pareprop"}.get(
            self.method, "backprop" if self.method in ("standard", *REMAT) else self.method)

    def overrides(self, variant_depths: dict) -> dict:
        out: dict = {"max_len": self.size} if self.text else {"img_size": self.size}
        if self.depth is not None:
            if "depths" in variant_depths:
                depths = list(variant_depths["depths"])
                depths[2] = self.depth
                out["depths"] = tuple(depths)
            else:
                out["depth"] = self.depth
        return out


def is_text(model: str) -> bool:
    """Text models (token ids in, sequence length as the size) by family name."""
    return model.startswith("roberta")


def default_size(model: str) -> int:
    return 128 if is_text(model) else 224


def check_cell(cell: Cell) -> None:
    if cell.framework not in BACKENDS:
        raise ValueError(f"framework must be one of {tuple(BACKENDS)}, got {cell.framework!r}")
    if cell.backend not in BACKENDS[cell.framework]:
        raise ValueError(f"backend {cell.backend!r} is not one of {cell.framework}'s "
                         f"{BACKENDS[cell.framework]}")
    allowed = GPU_METHODS if cell.backend == "gpu-compile" else METHODS
    if cell.method not in allowed:
        raise ValueError(f"method must be one of {allowed} here, got {cell.method!r}")
    if cell.kind == "speed" and cell.backend == "gpu-compile":
        raise ValueError("gpu-compile measures memory only (nothing runs)")
    if cell.batch < 1 or (cell.depth is not None and cell.depth < 1) or cell.size < 1:
        raise ValueError(f"batch, depth and size must be positive: {cell}")
    if cell.dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {cell.dtype!r}")


def variant_config(framework: str, model: str) -> dict:
    """The registry's variant fields (to read its stage depths)."""
    import importlib

    family, variant = model.split("-", 1)
    mod = importlib.import_module(f"{'revjax' if framework == 'jax' else 'revtorch'}"
                                  f".models.{family}")
    return mod.VARIANTS[variant]
