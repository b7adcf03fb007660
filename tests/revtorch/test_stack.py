"""RevStack: construction, the mode switch, optimizer steps, random shapes, torch.compile."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import revtorch

from .common import F, G, grads, loss_fn, make, rel_err


def test_public_api():
    assert revtorch.MODES == ("backprop", "reprop", "pareprop")
    assert revtorch.__version__ == "0.1.0"
    assert revtorch.DEFAULT_MODE == "reprop"  # pareprop holds more memory on the GPU compile
    stack = revtorch.RevStack(F, G, depth=3)
    assert stack.mode == revtorch.DEFAULT_MODE and stack.depth == 3
    assert revtorch.RevStack(F, G, depth=1, mode="pareprop").mode == "pareprop"
    assert isinstance(stack.f, nn.ModuleList) and isinstance(stack.g, nn.ModuleList)
    assert len(stack.f) == len(stack.g) == 3 and stack.f[0] is not stack.f[1]
    assert all(isinstance(m, F) for m in stack.f) and all(isinstance(m, G) for m in stack.g)
    assert "depth=3" in repr(stack)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(depth=0), ValueError, "at least 1"),
        (dict(depth=-2), ValueError, "at least 1"),
        (dict(depth=2.0), TypeError, "int"),
        (dict(depth=True), TypeError, "int"),
        (dict(depth=2, mode="revprop"), ValueError, "unknown mode"),
    ],
)
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        revtorch.RevStack(F, G, **kwargs)


def test_make_must_return_a_module():
    with pytest.raises(TypeError, match="make_g"):
        revtorch.RevStack(F, lambda: (lambda x: x), depth=2)


def test_call_mode_overrides_default_and_is_validated():
    stack, (x1, x2, mask, pos, per_layer) = make(2, mode="reprop")
    with pytest.raises(ValueError, match="unknown mode"):
        stack(x1, x2, mask, pos, per_layer=per_layer, mode="fast")
    y_backprop = stack(x1, x2, mask, pos, per_layer=per_layer, mode="backprop")
    y_default = stack(x1, x2, mask, pos, per_layer=per_layer)
    assert y_backprop[0].grad_fn.name() != y_default[0].grad_fn.name()
    assert "Reversible" in y_default[0].grad_fn.name()
    assert rel_err(y_default[1], y_backprop[1]) <= 1e-12


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_sgd_steps_match_backprop(mode):
    base, inputs = make(3)
    x1, x2, mask, pos, per_layer = inputs
    trained = {}
    for m in ("backprop", mode):
        stack = copy.deepcopy(base)
        opt = torch.optim.SGD(stack.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=m)).backward()
            torch.nn.utils.clip_grad_norm_(stack.parameters(), 10.0)
            opt.step()
        trained[m] = dict(stack.named_parameters())
    for name, want in trained["backprop"].items():
        assert rel_err(trained[mode][name], want) <= 1e-9, name
        assert rel_err(want, dict(base.named_parameters())[name]) > 0  # it did train


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 4),
    dim=st.integers(2, 6),
    depth=st.integers(1, 4),
    mode=st.sampled_from(["reprop", "pareprop"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_depths(batch, tokens, dim, depth, mode, seed):
    stack, inputs = make(depth, seed=seed, batch=batch, tokens=tokens, dim=dim)
    _, want = grads(stack, inputs, "backprop")
    _, got = grads(stack, inputs, mode)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-9, name


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_torch_compile_graph_breaks_around_the_core(mode):
    """torch.compile leaves the reprop/pareprop Function out of the graph (a graph break);
    compiled code around it, and the gradients, are unchanged."""
    dynamo = pytest.importorskip("torch._dynamo")
    stack, (x1, x2, mask, pos, per_layer) = make(2)

    def step(a, b):
        y1, y2 = stack(2 * a, b, mask, pos, per_layer=per_layer, mode=mode)
        return loss_fn(y1, y2)

    dynamo.reset()
    explained = dynamo.explain(step)(x1, x2)
    assert explained.graph_break_count >= 1
    compiled = torch.compile(step, backend="eager")
    results = []
    for fn in (step, compiled):
        stack.zero_grad(set_to_none=True)
        x1.grad = x2.grad = None
        fn(x1, x2).backward()
        results.append([x1.grad, x2.grad] + [p.grad for p in stack.parameters()])
    dynamo.reset()
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) <= 1e-12


# ------------------------------------------------------------- remat (standard-twin baseline)


def _retained_after_forward(model, x) -> int:
    """Bytes the forward leaves allocated (CPU allocator, via the profiler): what the backward
    keeps, saved tensors and selective checkpointing's stored outputs alike."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(x).square().mean()
    loss.backward()
    return sum(e.self_cpu_memory_usage for e in prof.events())


def _residual(depth, remat):
    torch.manual_seed(0)
    model = revtorch.models.build("vit-test", depth=depth, dim=16, heads=2, img_size=16,
                                  patch_size=4).double()
    return revtorch.set_remat(model, remat)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_remat_gradients_equal_plain_autograd_and_keep_less(depth):
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    plain = _residual(depth, None)
    plain_kept = _retained_after_forward(plain, x)
    ref = {n: p.grad for n, p in plain.named_parameters()}
    for policy in revtorch.REMAT_POLICIES:
        model = _residual(depth, policy)
        kept = _retained_after_forward(model, x)
        for n, p in model.named_parameters():
            assert rel_err(p.grad, ref[n]) <= 1e-12, (policy, n)
        if depth >= 3:
            assert kept < plain_kept, (policy, kept, plain_kept)


def test_remat_keeps_less_than_plain_and_dots_policy_keeps_the_matmuls():
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    kept = {p: _retained_after_forward(_residual(6, p), x)
            for p in (None,) + revtorch.REMAT_POLICIES}
    assert kept["nothing_saveable"] < kept["dots_with_no_batch_dims_saveable"] < kept[None]
    assert "remat='nothing_saveable'" in repr(_residual(2, "nothing_saveable").blocks)


def test_remat_errors():
    with pytest.raises(ValueError, match="no ResidualStack"):
        revtorch.set_remat(revtorch.models.build("rev-vit-test"), "nothing_saveable")
    std = revtorch.models.build("vit-test")
    with pytest.raises(ValueError, match="remat must be None or one of"):
        revtorch.set_remat(std, "everything")
    with pytest.raises(ValueError, match="remat must be None or one of"):
        revtorch.ResidualStack(F, G, depth=1, remat="dots")
    assert revtorch.set_remat(std, None) is std
