"""The cross-framework comparison, written once: the parity tests (``parity_tests/``) assert
on it and ``parity_report.py`` (``python -m experiments.bench parity``) tabulates
it.

A case is (model, dtype, depth). Its two models hold the same weights: the revtorch model is
built from torch's seed and loaded into the revjax model with ``revjax.interop.torch``. Both
see the same inputs, made by the model's family (``FAMILIES``): images for ViT and Swin
(NHWC for jax, NCHW for torch, and their gradient compared too), token ids with a padding mask for
RoBERTa (some positions padded; ids are not differentiable). Both take the same loss
``sum(logits * w)`` with a fixed random ``w``, so the gradients are one vector-Jacobian
product. Results are
cached per case and framework: a 3 x 3 table of mode pairs costs 3 + 3 gradient runs, and
jax compiles one program per graphdef (forward and every mode's gradients; modes static).
The tests check a whole case in one test (``check_case``), so that one process compiles it.

Differences are ``max|jax - torch| / max|torch|`` (docs/conventions.md), per output and per
parameter leaf (in the revjax layout), the largest reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import revjax
import revtorch
from revjax.interop.torch import from_torch, state_from_torch
from experiments.common import rel_err

MODELS = ("rev-vit-test", "vit-test")
DTYPES = ("float32", "float64")
DEPTHS = (1, 2, 3)
# RoBERTa: depth 2 only (its own test file, and report rows).
ROBERTA_MODELS = ("rev-roberta-test", "roberta-test")
ROBERTA_DEPTHS = (2,)
# Swin: the default test config only (depths (2, 1), two stages); depth None = no override.
SWIN_MODELS = ("rev-swin-test", "swin-test")
SWIN_DEPTHS = (None,)
# MViT: the default test config only (depths (2, 3, 2): reversible stacks of depth 2, 2, 1 and
# two pooling transitions).
MVIT_MODELS = ("rev-mvit-test", "mvit-test")
MVIT_DEPTHS = (None,)
# Parameter leaves whose gradient is zero in exact arithmetic, so that only roundoff is left to
# compare: MViT's K-pooling LayerNorm bias (a constant added to every key shifts each softmax
# row by a constant). They are compared against the whole gradient's scale instead.
ZERO_GRADIENT = re.compile(r"(^|\.)norm_k\.bias$")
SEQ_LEN = 8
BATCH = 2
SEED = 0
# docs/conventions.md: float64 <= 1e-9 for outputs and gradients; float32 <= 1e-5 outputs, 1e-4 grads.
TOL = {"float32": {"forward": 1e-5, "grad": 1e-4}, "float64": {"forward": 1e-9, "grad": 1e-9}}
# The parity programs are tiny and each runs once: skip LLVM's optimisations (halves XLA:CPU
# compile time; the HLO, and so the arithmetic, is the same).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
JAX_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def modes(name: str) -> tuple[str, ...]:
    """The backward modes a model takes: all three when reversible, else backprop."""
    return revjax.MODES if name.startswith("rev-") else ("backprop",)


def cases(models=MODELS, depths=DEPTHS) -> list[tuple[str, str, int]]:
    """Every (model, dtype, depth) (by default the ViT cases)."""
    return [(n, d, k) for n in models for d in DTYPES for k in depths]


def mode_pairs(name: str) -> list[tuple[str, str]]:
    """Every (jax mode, torch mode) a model is compared in."""
    return [(jm, tm) for jm in modes(name) for tm in modes(name)]


def mode_cases(models=MODELS, depths=DEPTHS) -> list[tuple[str, str, int, str, str]]:
    """Every (model, dtype, depth, jax mode, torch mode)."""
    return [(n, d, k, *pair) for n, d, k in cases(models, depths) for pair in mode_pairs(n)]


@contextlib.contextmanager
def precision(dtype: str):
    """Where the jax side of a comparison runs: on the CPU (as revtorch's models here, and
    free of GPU TF32 matmuls), with jax's x64 switch for float64, as a context (nothing leaks
    into other tests)."""
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64, jax.default_device(jax.devices("cpu")[0]):
        yield


# ---------------------------------------------------------------------------------------------
# The two models and the inputs of one case.


@functools.cache
def models(name: str, dtype: str, depth: int | None):
    """(revjax model, revtorch model) with the same weights; the jax one is built abstract
    (``nnx.eval_shape``, no initialisation) and filled from torch, under ``precision(dtype)``
    (as it must be used). ``depth`` None keeps the variant's own (Swin: per-stage depths)."""
    torch.manual_seed(SEED)
    kw = {} if depth is None else {"depth": depth}
    tmodel = revtorch.models.build(name, param_dtype=TORCH_DTYPES[dtype], **kw)
    with precision(dtype):
        jmodel = nnx.eval_shape(lambda: revjax.models.build(
            name, rngs=nnx.Rngs(SEED), param_dtype=JAX_DTYPES[dtype], **kw))
        from_torch(jmodel, tmodel.state_dict())
    return jmodel, tmodel


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@dataclasses.dataclass(frozen=True)
class Family:
    """How a model family is fed. ``make(config, rng, dtype)`` gives the model's positional
    inputs (numpy, jax layout) and the loss weights ``w`` (the logits' shape); ``to_torch``
    turns those inputs into revtorch's; ``grad_input`` is set when the first input is
    differentiated, and maps its torch gradient back to the jax layout."""

    make: Callable
    to_torch: Callable
    grad_input: Callable | None


def _vit_inputs(config, rng, dtype):
    x = rng.standard_normal((BATCH, config.img_size, config.img_size, config.in_chans))
    w = rng.standard_normal((BATCH, config.num_classes))
    return (x.astype(dtype),), w.astype(dtype)


def _roberta_inputs(config, rng, dtype):
    """Token ids (no pad id among the real ones) and a padding mask: row 0 full, row 1 with
    its last 3 positions padded (ids = pad_id there); ``w`` covers every position."""
    ids = rng.integers(0, config.vocab_size - 1, (BATCH, SEQ_LEN))
    ids = np.where(ids >= config.pad_id, ids + 1, ids)  # skip pad_id
    mask = np.ones((BATCH, SEQ_LEN), bool)
    mask[1, -3:] = False
    ids = np.where(mask, ids, config.pad_id).astype(np.int32)
    w = rng.standard_normal((BATCH, SEQ_LEN, config.vocab_size))
    return (ids, mask), w.astype(dtype)


_IMAGES = Family(_vit_inputs, lambda args: (to_nchw(args[0]),),
                 lambda g: g.numpy().transpose(0, 2, 3, 1))
FAMILIES = {
    "vit": _IMAGES,
    "swin": _IMAGES,  # images as ViT's: NHWC for jax, NCHW for torch, input gradient compared
    "mvit": _IMAGES,
    "roberta": Family(_roberta_inputs, lambda args: (torch.from_numpy(args[0]).long(),
                                                     torch.from_numpy(args[1])), None),
}


def family(name: str) -> Family:
    """The family of a model name: ``rev-roberta-test`` -> RoBERTa's."""
    return FAMILIES[name.removeprefix("rev-").split("-")[0]]


@functools.cache
def model_inputs(name: str, dtype: str, depth: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(the model's positional inputs, loss weights w of the logits' shape) as numpy arrays,
    floating ones in ``dtype``."""
    config = models(name, dtype, depth)[0].config
    return family(name).make(config, np.random.default_rng(SEED), dtype)


def inputs(name: str, dtype: str, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first model input (NHWC images for ViT), loss weights w)."""
    args, w = model_inputs(name, dtype, depth)
    return args[0], w


# ---------------------------------------------------------------------------------------------
# One framework, one mode: logits, parameter gradients (revjax layout, flat) and input grad.


@functools.cache
def _jax_program(graphdef, modes: tuple[str, ...], grad_input: bool):
    """One jitted program per graphdef: the plain forward (no differentiation) and, for each
    of ``modes`` (static), ``value_and_grad`` of the loss with respect to the parameters and
    (``grad_input``) the first input. One program instead of one per mode: XLA:CPU compiles
    it in about 2/3 of the time."""

    def run(params, rest, args, w):
        def loss(params, x, mode):
            logits = nnx.merge(graphdef, params, rest)(x, *args[1:], mode=mode)
            return jnp.sum(logits * w), logits

        out = {"forward": nnx.merge(graphdef, params, rest)(*args)}
        for mode in modes:
            if grad_input:
                (_, logits), (g_params, g_x) = jax.value_and_grad(
                    loss, argnums=(0, 1), has_aux=True)(params, args[0], mode)
            else:
                (_, logits), g_params = jax.value_and_grad(loss, has_aux=True)(
                    params, args[0], mode)
                g_x = None
            out[mode] = {"logits": logits, "params": g_params, "input": g_x}
        return out

    return jax.jit(run, compiler_options=COMPILER_OPTIONS)


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(state)}


@functools.cache
def jax_results(name: str, dtype: str, depth: int) -> dict:
    """revjax: {"forward": logits of the plain forward, mode: {"logits", "params" (flat
    dict, revjax layout), "input" (the first input's gradient, NHWC for images; None when
    it is not differentiated)} for each of ``modes(name)``}, as numpy."""
    jmodel, _ = models(name, dtype, depth)
    args, w = model_inputs(name, dtype, depth)
    grad_input = family(name).grad_input is not None
    with precision(dtype):
        graphdef, params, rest = nnx.split(jmodel, nnx.Param, ...)
        out = _jax_program(graphdef, modes(name), grad_input)(
            params, rest, tuple(jnp.asarray(a) for a in args), jnp.asarray(w))
        return {k: np.asarray(v) if k == "forward" else
                {"logits": np.asarray(v["logits"]), "params": _flat(v["params"]),
                 "input": None if v["input"] is None else np.asarray(v["input"])}
                for k, v in out.items()}


def jax_forward(name: str, dtype: str, depth: int) -> np.ndarray:
    """Logits of the revjax model's plain forward."""
    return jax_results(name, dtype, depth)["forward"]


def jax_grads(name: str, dtype: str, depth: int, mode: str) -> dict:
    """{"logits", "params", "input"} from revjax in ``mode``."""
    return jax_results(name, dtype, depth)[mode]


@functools.cache
def torch_forward(name: str, dtype: str, depth: int) -> np.ndarray:
    """Logits of the revtorch model (no autograd)."""
    _, tmodel = models(name, dtype, depth)
    args, _ = model_inputs(name, dtype, depth)
    with torch.no_grad():
        return tmodel(*family(name).to_torch(args)).numpy()


@functools.cache
def torch_grads(name: str, dtype: str, depth: int, mode: str) -> dict:
    """The same from revtorch after ``loss.backward()``; parameter gradients converted to the
    revjax layout by the weight converter, the input gradient to jax's layout."""
    jmodel, tmodel = models(name, dtype, depth)
    args, w = model_inputs(name, dtype, depth)
    fam = family(name)
    tmodel.zero_grad(set_to_none=True)
    targs = fam.to_torch(args)
    if fam.grad_input is not None:
        targs[0].requires_grad_()
    logits = tmodel(*targs, mode=mode)
    (logits * torch.from_numpy(w)).sum().backward()
    grads = {k: p.grad for k, p in tmodel.named_parameters()}
    with precision(dtype):
        g_params = _flat(state_from_torch(jmodel, grads))
    return {"logits": logits.detach().numpy(), "params": g_params,
            "input": None if fam.grad_input is None else fam.grad_input(targs[0].grad)}


# ---------------------------------------------------------------------------------------------
# The comparisons.


def forward_diff(name: str, dtype: str, depth: int) -> float:
    """Relative difference of the plain forward outputs."""
    return rel_err(jax_forward(name, dtype, depth), torch_forward(name, dtype, depth))


def grad_diffs(name: str, dtype: str, depth: int, jax_mode: str, torch_mode: str) -> dict:
    """Relative differences between revjax in ``jax_mode`` and revtorch in ``torch_mode``:
    ``logits`` (the differentiated forward), ``input`` (the first input's gradient; None
    when it is not differentiated, as token ids), ``params`` (the largest over parameter
    leaves; a ``ZERO_GRADIENT`` leaf's difference relative to the largest gradient entry of
    any leaf) and ``worst`` (that leaf's path)."""
    a = jax_grads(name, dtype, depth, jax_mode)
    b = torch_grads(name, dtype, depth, torch_mode)
    assert a["params"].keys() == b["params"].keys()
    scale = max(float(np.abs(g).max()) for g in b["params"].values())
    per_leaf = {k: (float(np.abs(a["params"][k] - b["params"][k]).max()) / scale
                    if ZERO_GRADIENT.search(k) else rel_err(a["params"][k], b["params"][k]))
                for k in a["params"]}
    worst = max(per_leaf, key=per_leaf.get)
    g_input = None if b["input"] is None else rel_err(a["input"], b["input"])
    return {"logits": rel_err(a["logits"], b["logits"]), "input": g_input,
            "params": per_leaf[worst], "worst": worst}


def case_id(case) -> str:
    """A case's test id: ``model-dtype[-depthN][-jax mode-torch mode]`` (no depth when the
    case keeps the variant's own, depth None)."""
    name, dtype, depth, *pair = case
    return "-".join([name, dtype, *([] if depth is None else [f"depth{depth}"]), *pair])


def check_forward(case) -> None:
    """Assert a (model, dtype, depth) case's plain forward logits agree within ``TOL``."""
    name, dtype, depth = case
    diff = forward_diff(name, dtype, depth)
    assert diff <= TOL[dtype]["forward"], f"{case_id(case)}: logits differ by {diff:.2e}"


def check_gradients(case) -> None:
    """Assert a (model, dtype, depth, jax mode, torch mode) case's differentiated logits,
    input gradient (None when the family's input is not differentiated, as token ids) and
    every parameter gradient agree within ``TOL``."""
    name, dtype, depth, jax_mode, torch_mode = case
    d = grad_diffs(name, dtype, depth, jax_mode, torch_mode)
    tol = TOL[dtype]
    assert d["logits"] <= tol["forward"], f"{case_id(case)}: logits differ: {d}"
    if family(name).grad_input is None:
        assert d["input"] is None
    else:
        assert d["input"] <= tol["grad"], f"{case_id(case)}: input gradients differ: {d}"
    assert d["params"] <= tol["grad"], f"{case_id(case)}: parameter gradients differ: {d}"


def check_case(case) -> None:
    """Assert a (model, dtype, depth) case agrees in full: the forward logits, then every
    (jax mode, torch mode) pair's gradients; every failure is reported, not just the first.
    One test per case, not one per pair: the case's jax program (the costly part, up to a
    minute of XLA:CPU compile for MViT) is cached per process, and pairs of one case spread
    over xdist workers would compile it once on each."""
    name = case[0]
    failures = []
    for check, sub in [(check_forward, case)] + [
            (check_gradients, (*case, *pair)) for pair in mode_pairs(name)]:
        try:
            check(sub)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# GPU: PaReprop against Reprop in each framework (speed, and the gradients still agreeing).
# Rev-ViT-L at 224 px, batch 64, float32 (PaReprop: Zhu & Mangalam 2023, arXiv:2306.09342,
# benchmark Rev-ViT-L at 224 px over training batch sizes). Bounded: two compiles (jax), one
# gradient step per mode for the comparison, then GPU_WARMUP + GPU_STEPS timed rounds.

GPU_MODEL, GPU_IMG, GPU_BATCH = "rev-vit-l", 224, 64
GPU_WARMUP, GPU_STEPS = 2, 5
GPU_MODES = ("reprop", "pareprop")


def jax_gpus() -> list:
    """jax's GPU devices (empty without a CUDA backend)."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _timing():
    from experiments.common import interleaved_medians  # the timing every experiment uses

    return functools.partial(interleaved_medians, warmup=GPU_WARMUP, reps=GPU_STEPS)


def jax_gpu_speed(device=None) -> dict:
    """revjax on ``device`` (default: the first GPU): {"seconds": {mode: median seconds per
    gradient step}, "grad_diff": largest relative parameter-gradient difference, pareprop
    against reprop}."""
    from revjax.train import cross_entropy_loss

    with jax.default_device(device or jax_gpus()[0]):
        model = revjax.models.build(GPU_MODEL, rngs=nnx.Rngs(SEED), img_size=GPU_IMG)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        kx, ky = jax.random.split(jax.random.key(SEED))
        x = jax.random.normal(kx, (GPU_BATCH, GPU_IMG, GPU_IMG, 3))
        y = jax.random.randint(ky, (GPU_BATCH,), 0, model.config.num_classes)

        def loss(params, rest, x, y, mode):
            return cross_entropy_loss(nnx.merge(graphdef, params, rest)(x, mode=mode), y)

        fn = jax.jit(jax.grad(loss), static_argnums=4)
        step = {m: fn.lower(params, rest, x, y, m).compile() for m in GPU_MODES}
        grads = {m: step[m](params, rest, x, y) for m in GPU_MODES}
        diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(
            jax.tree.leaves(grads["pareprop"]), jax.tree.leaves(grads["reprop"])))
        del grads
        seconds = _timing()({m: (lambda c=c: jax.block_until_ready(c(params, rest, x, y)))
                             for m, c in step.items()})
    return {"seconds": seconds, "grad_diff": diff}


def torch_gpu_speed(device: str = "cuda") -> dict:
    """revtorch on ``device``: the same as ``jax_gpu_speed``."""
    torch.manual_seed(SEED)
    model = revtorch.models.build(GPU_MODEL, img_size=GPU_IMG).to(device)
    x = torch.randn(GPU_BATCH, 3, GPU_IMG, GPU_IMG, device=device)
    y = torch.randint(0, model.config.num_classes, (GPU_BATCH,), device=device)

    def step(mode):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, mode=mode), y).backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    grads = {}
    for m in GPU_MODES:
        step(m)
        grads[m] = {k: p.grad.clone() for k, p in model.named_parameters()}
    diff = max(((grads["pareprop"][k] - g).abs().max() / g.abs().max()).item()
               for k, g in grads["reprop"].items())
    del grads
    seconds = _timing()({m: (lambda m=m: step(m)) for m in GPU_MODES})
    return {"seconds": seconds, "grad_diff": diff}
