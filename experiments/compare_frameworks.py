"""revjax next to revtorch: gradient-step time per mode for the same model, batch and image
size, with each framework's memory measure (jax: compiled temp bytes of the gradient
function; torch: bytes of tensors autograd saves for backward, via saved_tensors_hooks).

    python experiments/compare_frameworks.py                         # rev-vit-s, 64 px, batch 4
    python experiments/compare_frameworks.py --model rev-vit-test --img 32 --batch 8
    python experiments/compare_frameworks.py --model rev-roberta-base --img 32 --batch 2
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import atomic_write_json, environment, interleaved_medians, table  # noqa: E402

import revjax  # noqa: E402
import revtorch  # noqa: E402
from revjax.mlm import mlm_loss as jax_mlm_loss  # noqa: E402
from revjax.train import cross_entropy_loss  # noqa: E402
from revtorch.mlm import mlm_loss as torch_mlm_loss  # noqa: E402


def is_text(name: str) -> bool:
    return "roberta" in name


def overrides(name, img, depth):
    """``img`` is the image size for vision models and the sequence length for text ones."""
    return ({} if is_text(name) else {"img_size": img}) | ({"depth": depth} if depth else {})


def jax_steps(name, img, batch, depth):
    model = revjax.models.build(name, rngs=nnx.Rngs(0), **overrides(name, img, depth))
    graphdef, params = nnx.split(model)
    c = model.config
    if is_text(name):  # token ids; the labels are the ids themselves at every position
        images = jax.random.randint(jax.random.key(0), (batch, img), 2, c.vocab_size)
        labels, crit = images, jax_mlm_loss
    else:
        images = jax.random.normal(jax.random.key(0), (batch, img, img, 3))
        labels = jax.random.randint(jax.random.key(1), (batch,), 0, c.num_classes)
        crit = cross_entropy_loss

    def loss(params, mode):
        return crit(nnx.merge(graphdef, params)(images, mode=mode), labels)

    fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    compiled = {m: fn.lower(params, m).compile() for m in revjax.MODES}
    steps = {m: (lambda c=c: jax.block_until_ready(c(params))) for m, c in compiled.items()}
    mem = {m: c.memory_analysis().temp_size_in_bytes for m, c in compiled.items()}
    return steps, mem


def torch_steps(name, img, batch, depth):
    torch.manual_seed(0)
    model = revtorch.models.build(name, **overrides(name, img, depth))
    if is_text(name):
        images = torch.randint(2, model.config.vocab_size, (batch, img))
        labels, crit = images, torch_mlm_loss
    else:
        images = torch.randn(batch, 3, img, img)
        labels = torch.randint(0, model.config.num_classes, (batch,))
        crit = torch.nn.functional.cross_entropy

    def step(mode):
        model.zero_grad(set_to_none=True)
        loss = crit(model(images, mode=mode), labels)
        loss.backward()

    def saved_bytes(mode):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = crit(model(images, mode=mode), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return total

    return ({m: (lambda m=m: step(m)) for m in revtorch.MODES},
            {m: saved_bytes(m) for m in revtorch.MODES})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rev-vit-s")
    ap.add_argument("--img", type=int, default=64,
                    help="image size; the sequence length for text models")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="results/compare_frameworks.json")
    args = ap.parse_args(argv)
    j_steps, j_mem = jax_steps(args.model, args.img, args.batch, args.depth)
    t_steps, t_mem = torch_steps(args.model, args.img, args.batch, args.depth)
    # Each framework's modes are interleaved among themselves; the two frameworks are timed
    # one after the other, since alternating them makes each one's idle thread pool spin
    # against the other's work (measured: 10x slower torch steps when interleaved).
    times = {("jax", m): t for m, t in
             interleaved_medians(j_steps, warmup=2, reps=args.reps).items()}
    times |= {("torch", m): t for m, t in
              interleaved_medians(t_steps, warmup=2, reps=args.reps).items()}
    rows = [{"mode": m,
             "revjax step ms": f"{1e3 * times['jax', m]:.1f}",
             "revtorch step ms": f"{1e3 * times['torch', m]:.1f}",
             "revjax temp MiB": f"{j_mem[m] / 2**20:.1f}",
             "revtorch saved-activation MiB": f"{t_mem[m] / 2**20:.2f}"}
            for m in revjax.MODES]
    unit = "tokens" if is_text(args.model) else "px"
    print(f"{args.model}, {args.img} {unit}, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    print(table(rows, list(rows[0])))
    atomic_write_json(args.out, {"args": vars(args), "rows": rows,
                                 "environment": environment()})


if __name__ == "__main__":
    main()
