"""Numerics options of the core (``revtorch.numerics``, ``revtorch.rebuild``): the
float32-stream precision policy, re-anchoring and the rebuild check; the twin of
tests/revjax/test_numerics.py."""

import pytest
import torch
from torch import nn

import revtorch

from .common import grads, loss_fn, make, rel_err, saved_bytes


def max_err(got, want):
    return max(rel_err(got[k], want[k]) for k in want)


class Steep(nn.Module):
    """A badly conditioned half: ``4 sin(x W)`` with large weights (see the jax twin)."""

    def __init__(self, dim=16, scale=5.0, amplitude=4.0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) * scale / dim ** 0.5)
        self.amplitude = amplitude

    def forward(self, x, *shared, **per_layer):
        return self.amplitude * torch.sin(x @ self.w)


def steep(depth, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    stack = revtorch.RevStack(Steep, lambda: Steep(scale=1.0, amplitude=1.0), depth=depth)
    x = torch.randn(4, 16)
    return stack.to(dtype), x.to(dtype)


def steep_grads(stack, x, mode, **options):
    stack.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y1, y2 = revtorch.reversible(stack.f, stack.g, x, x, mode=mode, **options)
    torch.sin(y1 + y2).float().sum().backward()
    out = {n: p.grad.clone() for n, p in stack.named_parameters()}
    out["x"] = x.grad.clone()
    return out


# --------------------------------------------------------------------- the policy

@pytest.mark.parametrize("depth", [1, 3, 5])
def test_policy_gradients_match_backprop(depth):
    """float32 halves on float64 streams, every mode against backprop with the same policy."""
    stack, inputs = make(depth, torch.float32)
    x1, x2, mask, pos, per_layer = inputs

    def run(mode):
        stack.zero_grad(set_to_none=True)
        y1, y2 = revtorch.reversible(stack.f, stack.g, x1, x2, (mask, pos),
                                     per_layer, mode=mode, stream_dtype="float64")
        assert y1.dtype == y2.dtype == torch.float64
        loss_fn(y1, y2).backward()
        return {n: p.grad.clone() for n, p in stack.named_parameters()}

    want = run("backprop")
    for mode in ("reprop", "pareprop"):
        assert max_err(run(mode), want) <= 1e-5, mode


def test_policy_bf16_halves_float32_streams():
    """bfloat16 parameters and halves: with float32 streams reprop equals backprop (same
    policy); all-bfloat16 it drifts by far more."""
    stack, x = steep(5, torch.bfloat16)
    for mode in ("reprop", "pareprop"):
        want = steep_grads(stack, x, "backprop", stream_dtype=torch.float32)
        assert max_err(steep_grads(stack, x, mode, stream_dtype="float32"), want) <= 1e-4
        drift = max_err(steep_grads(stack, x, mode), steep_grads(stack, x, "backprop"))
        assert drift > 1e-2, drift


def test_policy_keeps_the_streams_in_float32():
    seen = []

    class Probe(Steep):
        def forward(self, x, *shared, **per_layer):
            seen.append(x.dtype)
            out = super().forward(x)
            assert out.dtype == torch.bfloat16
            return out

    stack = revtorch.RevStack(lambda: Probe(scale=1.0), lambda: Probe(scale=1.0), depth=3,
                              stream_dtype="float32").to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    y1, y2 = stack(x, x)
    assert y1.dtype == y2.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    for y in (y1, y2):  # float32 sums, not bfloat16 values
        assert (y != y.to(torch.bfloat16).float()).float().mean() > 0.5
    (y1.sum() + y2.sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    assert "stream_dtype=torch.float32" in repr(stack)


# ---------------------------------------------------------------------- anchors

@pytest.mark.parametrize("depth, ks", [(1, (1, 2)), (2, (1, 3)), (3, (2,)), (4, (3,)),
                                       (5, (2, 3)), (6, (4,)), (7, (2, 3, 8))])
def test_anchored_gradients_match_backprop(depth, ks):
    stack, inputs = make(depth)
    _, want = grads(stack, inputs, "backprop")
    for k in ks:
        stack.anchor_every = k
        assert max_err(grads(stack, inputs, "backprop")[1], want) == 0  # ignored
        for mode in ("reprop", "pareprop"):
            assert max_err(grads(stack, inputs, mode)[1], want) <= 1e-9, (mode, k)


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_anchors_restart_the_rebuild(mode):
    stack, x = steep(6)
    want = steep_grads(stack, x, "backprop")
    err = {k: max_err(steep_grads(stack, x, mode, anchor_every=k), want) for k in (None, 2, 1)}
    assert err[None] > 1e-4, err
    assert err[1] <= 1e-6, err
    assert err[2] < err[None] / 10, err
    e = revtorch.rebuild_errors(stack.f, stack.g, x, x, anchor_every=2)
    assert all(v == 0 for v in e[::2]) and all(v > 0 for v in e[1::2])


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_anchor_memory_is_one_stream_pair_per_anchor(mode):
    """Saved bytes grow by exactly one stream pair per anchor (ceil(depth / k) anchors)."""
    stack, (x1, x2, mask, pos, per_layer) = make(6, torch.float32, batch=4, tokens=16)
    pair = 2 * x1.numel() * x1.element_size()

    def saved(k):
        stack.anchor_every = k
        return saved_bytes(
            lambda: loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode)),
            (mask, pos, *per_layer.values()))

    base = saved(None)
    for k in (1, 2, 4):
        assert saved(k) - base == -(-6 // k) * pair, k


def test_option_errors():
    with pytest.raises(ValueError, match="unknown stream_dtype 'float33'"):
        revtorch.RevStack(Steep, Steep, depth=1, stream_dtype="float33")
    with pytest.raises(ValueError, match="floating dtype"):
        revtorch.RevStack(Steep, Steep, depth=1, stream_dtype=torch.int32)
    with pytest.raises(ValueError, match="at least 1"):
        revtorch.RevStack(Steep, Steep, depth=1, anchor_every=0)
    with pytest.raises(TypeError, match="anchor_every must be None or an int"):
        revtorch.RevStack(Steep, Steep, depth=1, anchor_every=1.5)


# ----------------------------------------------------------------- the rebuild check

def test_check_rebuild_passes_and_names_the_layer_that_drifts():
    stack, (x1, x2, mask, pos, per_layer) = make(5, torch.float32)
    ok = stack.check_rebuild(x1, x2, mask, pos, per_layer=per_layer, threshold=1e-5)
    assert len(ok) == 5 and 0 < max(ok) <= 1e-5
    bad, x = steep(6, torch.bfloat16)
    errors = revtorch.rebuild_errors(bad.f, bad.g, x, x)
    first = max(i for i, e in enumerate(errors) if e > 0.05)
    with pytest.raises(revtorch.RebuildError,
                       match=rf"layer {first} \(of 6.*relative error .* > threshold 0.05"):
        bad.check_rebuild(x, x, threshold=0.05)
    with pytest.warns(RuntimeWarning, match=f"layer {first} "):
        assert bad.check_rebuild(x, x, threshold=0.05, on_error="warn") == errors
    bad.stream_dtype = torch.float32
    assert max(bad.check_rebuild(x, x, threshold=0.05)) < max(errors) / 10
    with pytest.raises(ValueError, match="on_error"):
        bad.check_rebuild(x, x, on_error="ignore")


def test_model_options_and_check_mode():
    model = revtorch.models.build("rev-vit-test", depth=4, stream_dtype="float32",
                                  anchor_every=3, dtype=torch.bfloat16)
    assert model.blocks.stream_dtype == torch.float32 and model.blocks.anchor_every == 3
    images = torch.randn(2, 3, 32, 32)
    with revtorch.check_rebuilds(threshold=1e-3) as reports:
        model(images)
    assert [r["call"] for r in reports] == [0] and len(reports[0]["errors"]) == 4
    model.blocks.stream_dtype = None  # all-bfloat16: a visible drift
    with revtorch.check_rebuilds(threshold=1e-30), pytest.raises(
            revtorch.RebuildError, match=r"\(RevStack call 0\).*layer"):
        model(images)
    with pytest.raises(ValueError, match="reversible"):
        revtorch.models.build("vit-test", anchor_every=2)
