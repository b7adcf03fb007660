"""Parameter counts of every registered family, without allocating (``nnx.eval_shape``),
beside the standard models' published counts.

    python -m experiments.bench params
"""

from __future__ import annotations

import jax
from flax import nnx

import revjax

from experiments.common import table

# Published counts (millions) of the standard models, with their class token where they
# have one: DeiT-Ti/S (Touvron et al., 2021), ViT-B/L/H (Dosovitskiy et al., 2021),
PUBLISHED = {"vit-ti": 5.7, "vit-s": 22.1, "vit-b": 86.6, "vit-l": 304.3, "vit-h": 632.0,
             # Swin-T/S/B/L, 1000 classes (Liu et al., 2021); RoBERTa (Liu et al., 2019)
             "swin-t": 28.3, "swin-s": 49.6, "swin-b": 87.8, "swin-l": 197.0,
             "roberta-base": 125.0, "roberta-large": 355.0,
             # MViTv2-T/S/B (Li et al., 2022, Table 2; timm: 24.17M, 34.87M, 51.47M)
             "mvit-t": 24.0, "mvit-s": 35.0, "mvit-b": 52.0}


def count(name: str) -> int:
    model = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0)))
    return sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv=None) -> None:
    rows = []
    for name in revjax.models.names():
        if not name.startswith("rev-") or name.endswith("-test"):
            continue
        std_name = name[len("rev-"):]
        rev, std = count(name), count(std_name)
        pub = PUBLISHED.get(std_name)
        rows.append({"model": name, "reversible": f"{rev:,}", "standard twin": f"{std:,}",
                     "published (standard)": f"{pub}M" if pub else "",
                     "reversible - standard": f"+{rev - std:,} ({100 * (rev - std) / std:.2f}%)"})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
