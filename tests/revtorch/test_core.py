"""The reversible core: gradients, inverse, saved memory, the PaReprop schedule, errors."""

import contextlib
import itertools
import weakref

import pytest
import torch
from torch import nn

import revtorch
from revtorch import core, streams
from revtorch.layers import AttentionHalf, MlpHalf, layer_keys

from .common import DIM, F, G, grads, loss_fn, make, rel_err, saved_bytes

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
DEPTHS = (1, 2, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_gradients_match_backprop(mode, depth, dtype):
    stack, inputs = make(depth, dtype)
    want_loss, want = grads(stack, inputs, "backprop")
    got_loss, got = grads(stack, inputs, mode)
    assert rel_err(got_loss, want_loss) <= (1e-5 if dtype == torch.float32 else 1e-9)
    assert got.keys() == want.keys() and len(got) == 10 * depth + 2
    for name in want:
        assert rel_err(got[name], want[name]) <= TOL[dtype], name


def dropout_case(depth):
    """Attention and MLP halves with dropout and drop-path drawing from per-layer keys:
    (stack, x1, x2, shared, per_layer)."""
    torch.manual_seed(0)
    stack = revtorch.RevStack(
        lambda: AttentionHalf(DIM, 2, drop_rate=0.2, drop_path_rate=0.3),
        lambda: MlpHalf(DIM, 2 * DIM, drop_rate=0.2, drop_path_rate=0.3),
        depth=depth).double()
    x1, x2 = (torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True) for _ in "12")
    return stack, x1, x2, (torch.rand(3, 5) > 0.3,), layer_keys(depth)


OPTIONS = {"anchor_every=1": {"anchor_every": 1}, "anchor_every=2": {"anchor_every": 2},
           "anchor_every=3": {"anchor_every": 3}, "stream_dtype": {}, "dropout": {}}


@pytest.mark.parametrize("case", OPTIONS)
@pytest.mark.parametrize("depth", range(1, 8))
def test_options_gradients_match_backprop(depth, case):
    """Anchors, the precision policy (float32 halves on float64 streams: the rebuild is
    exact) and per-layer dropout keys, at every depth to 7: reprop and pareprop equal
    backprop, and each other exactly (on CPU they run the same halves in the same order)."""
    if case == "dropout":
        stack, x1, x2, shared, per_layer = dropout_case(depth)
    else:
        dtype = torch.float32 if case == "stream_dtype" else torch.float64
        stack, (x1, x2, mask, pos, per_layer) = make(depth, dtype)
        shared = (mask, pos)
    for name, value in OPTIONS[case].items():
        setattr(stack, name, value)
    if case == "stream_dtype":
        stack.stream_dtype = torch.float64

    def run(mode):
        stack.zero_grad(set_to_none=True)
        x1.grad = x2.grad = None
        loss_fn(*stack(x1, x2, *shared, per_layer=per_layer, mode=mode)).backward()
        return {**{n: p.grad.clone() for n, p in stack.named_parameters()},
                "x1": x1.grad.clone(), "x2": x2.grad.clone()}

    want, reprop = run("backprop"), run("reprop")
    for name in want:
        assert rel_err(reprop[name], want[name]) <= 1e-9, name
    assert all(torch.equal(got, reprop[name]) for name, got in run("pareprop").items())
    if case == "dropout":  # the keys do drop: the branches change
        with torch.no_grad():
            kept, dropped = (stack(x1, x2, *shared, per_layer=keys)[0] - x1
                             for keys in (None, per_layer))
        assert rel_err(dropped, kept) > 1e-2


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_shared_and_per_layer_inputs_get_no_gradient(mode):
    stack, inputs = make(3)
    x1, x2, mask, pos, per_layer = inputs
    grads(stack, inputs, mode)
    assert pos.grad is None and per_layer["scale"].grad is None
    assert x1.grad is not None and x2.grad is not None


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_inputs_without_grad_still_train_parameters(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(3)
    x1, x2 = x1.detach(), x2.detach()
    got, want = {}, {}
    for m, out in ((mode, got), ("backprop", want)):
        stack.zero_grad(set_to_none=True)
        loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=m)).backward()
        out.update({n: p.grad.clone() for n, p in stack.named_parameters()})
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-9, name


@pytest.mark.parametrize("depth", DEPTHS)
def test_inverse_rebuilds_inputs(depth):
    stack, (x1, x2, mask, pos, per_layer) = make(depth)
    with torch.no_grad():
        y1, y2 = stack(x1, x2, mask, pos, per_layer=per_layer)
    r1, r2 = core.inverse(stack.f, stack.g, y1, y2, (mask, pos), per_layer)
    assert rel_err(r1, x1) <= 1e-13 and rel_err(r2, x2) <= 1e-13
    # the backward's rebuild of the top layer's two halves gives the same inputs, and they
    # map forward to Y
    kw = core._slice(per_layer, depth - 1)
    g = core._Half(stack.g[-1], y1, y2, (mask, pos), kw)
    f = core._Half(stack.f[-1], g.rebuilt, y1, (mask, pos), kw)
    assert g.leaf.is_leaf and f.leaf.is_leaf and g.out.requires_grad and f.out.requires_grad
    assert not g.rebuilt.requires_grad and not f.rebuilt.requires_grad
    with torch.no_grad():
        w1 = f.rebuilt + stack.f[-1](g.rebuilt, mask, pos, **kw)
        w2 = g.rebuilt + stack.g[-1](w1, mask, pos, **kw)
    assert rel_err(w1, y1) <= 1e-13 and rel_err(w2, y2) <= 1e-13


def _saved_bytes(mode, depth):
    """Bytes of the tensors saved for backward by forward + loss, leaving out the shared and
    per-layer inputs (not activations, and the per-layer ones grow with depth by design)."""
    stack, (x1, x2, mask, pos, per_layer) = make(depth, torch.float32, batch=4, tokens=16)
    return saved_bytes(
        lambda: loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode)),
        (mask, pos, *per_layer.values()))


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_saved_activation_bytes(mode):
    small, large = _saved_bytes(mode, 2), _saved_bytes(mode, 8)
    if mode == "backprop":
        assert large > 3 * small
    else:
        assert large <= 1.1 * small


def backward_peak_bytes(mode, depth=6):
    """The most bytes the backward holds above what it started with (rebuilt graphs,
    cotangents, parameter gradients), from the CPU allocator's events as the profiler
    records them."""
    stack, (x1, x2, mask, pos, per_layer) = make(depth, torch.float32, batch=8, tokens=32,
                                                  dim=64)
    loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        loss.backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: same-time events in order
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def test_pareprop_backward_peak_is_reprops():
    """PaReprop at the granularity of halves holds at most two halves' graphs, as reprop's
    layer: its backward's peak bytes stay within 15% of reprop's (a layer-granularity
    schedule holds one half's graph more: about 18% here)."""
    grad_bytes = 4 * sum(p.numel() for p in make(6, dim=64)[0].parameters())
    reprop, pareprop = backward_peak_bytes("reprop"), backward_peak_bytes("pareprop")
    assert reprop > grad_bytes  # the peak sees more than the parameter gradients
    assert pareprop <= 1.15 * reprop, (pareprop, reprop)


# --- the PaReprop schedule, through stand-in streams that record work, events and waits ---


class RecordingStreams(streams.InOrderStreams):
    """Runs everything in order, recording ``(op, stream, payload)`` for each call, and the
    number of rebuilt halves alive (``live``, a weak set) as each piece of work starts and
    ends (``alive``)."""

    def __init__(self, live=()):
        self.log, self.events, self.live, self.alive = [], itertools.count(), live, []

    @contextlib.contextmanager
    def on(self, k, label):
        self.log.append(("work", k, label))
        self.alive.append(len(self.live))
        yield
        self.alive.append(len(self.live))

    def record(self, k):
        event = next(self.events)
        self.log.append(("record", k, event))
        return event

    def wait(self, k, event):
        self.log.append(("wait", k, event))

    def keep(self, tensor, k):
        self.log.append(("keep", k, tensor))


def happens_before(log):
    """``before(a, b)``: log entry a is ordered before entry b on the device (same stream and
    earlier, or through a recorded event some stream waited on)."""
    preds, last, recorded = {}, {}, {}
    for n, (op, k, payload) in enumerate(log):
        preds[n] = {last[k]} if k in last else set()
        if op == "record":
            recorded[payload] = n
        if op == "wait":
            preds[n].add(recorded[payload])
        last[k] = n

    def before(a, b):
        seen, todo = set(), [b]
        while todo:
            for p in preds[todo.pop()] - seen:
                if p == a:
                    return True
                seen.add(p)
                todo.append(p)
        return False

    return before


def walk(depth):
    """The halves as the backward walks them: G_{D-1}, F_{D-1}, ..., G_0, F_0."""
    return [(half, i) for i in range(depth - 1, -1, -1) for half in "GF"]


def pipeline(depth):
    """The half-level pipeline in host order: rebuild G_{D-1}; then at step k the grads of
    half k beside the rebuild of half k+1 (per layer i: grads G_i, rebuild F_i; grads F_i,
    rebuild G_{i-1})."""
    halves = walk(depth)
    labels = [("rebuild", *halves[0])]
    for k, half in enumerate(halves):
        labels += [("grads", *half)] + ([("rebuild", *halves[k + 1])] if k + 1 < len(halves)
                                        else [])
    return labels


def record_pareprop(depth, monkeypatch, **options):
    """A pareprop backward on recording streams, counting live halves; (log, alive counts,
    live set after the backward, stack, pareprop's gradients, backprop's)."""
    live, made = weakref.WeakSet(), []

    class Counted(core._Half):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)

    def streams_for(device):
        made.append(RecordingStreams(live))
        return made[-1]

    monkeypatch.setattr(core, "_Half", Counted)
    monkeypatch.setattr(streams, "streams_for", streams_for)
    stack, inputs = make(depth)
    for name, value in options.items():
        setattr(stack, name, value)
    _, want = grads(stack, inputs, "backprop")
    _, got = grads(stack, inputs, "pareprop")
    assert len(made) == 1
    return made[0].log, made[0].alive, live, stack, got, want


@pytest.mark.parametrize("anchor_every", [None, 2])
@pytest.mark.parametrize("depth", range(1, 8))
def test_pareprop_schedule(depth, anchor_every, monkeypatch):
    log, _, _, stack, got, want = record_pareprop(depth, monkeypatch, anchor_every=anchor_every)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-9, name
    before = happens_before(log)
    work = {payload: n for n, (op, k, payload) in enumerate(log) if op == "work"}
    stream = {payload: k for op, k, payload in log if op == "work"}
    assert [payload for op, _, payload in log if op == "work"] == pipeline(depth)
    halves = walk(depth)
    for k, half in enumerate(halves):
        # G halves on stream 0, F halves on stream 1: a half's grads where it was rebuilt
        assert stream["rebuild", *half] == stream["grads", *half] == "GF".index(half[0])
        assert before(work["rebuild", *half], work["grads", *half])  # its graph is built
        if k:
            prev = halves[k - 1]
            assert before(work["grads", *prev], work["grads", *half])  # its cotangents
            assert before(work["rebuild", *prev], work["rebuild", *half])  # its streams
        if k + 1 < len(halves):  # grads of half k beside the rebuild of half k+1: unordered
            a, b = work["grads", *half], work["rebuild", *halves[k + 1]]
            assert not before(a, b) and not before(b, a)
    # the caller's stream: first an event the work waits on, last a wait on the end
    assert log[0][:2] == ("record", streams.CALLER) and log[-1][:2] == ("wait", streams.CALLER)
    for n in work.values():
        assert before(0, n) and before(n, len(log) - 1)
    # one device-side wait per cross-stream hand-off (no host-side syncs exist): the caller's
    # inputs, then per layer X2 and dX1 (G to F), X1 and dX2 (F to G) but none below the
    # bottom nor above the top, and the result back to the caller
    assert [op for op, k, _ in log].count("wait") == 4 * depth
    kept = [k for op, k, _ in log if op == "keep"]
    params = len(list(stack.parameters()))  # dx1, dx2 and every .grad handed to the caller
    assert kept.count(streams.CALLER) == 2 + params


@pytest.mark.parametrize("depth", range(1, 8))
def test_pareprop_holds_at_most_two_halves(depth, monkeypatch):
    """At most two rebuilt halves' graphs are alive: on the host (live ``_Half`` objects as
    each piece of work starts and ends) and on the device, where a half's graph lives from
    its rebuild to the end of its grads: the grads of every half but the one just before it
    are ordered before a half's rebuild. Each graph is freed right after its grads."""
    log, alive, live, *_ = record_pareprop(depth, monkeypatch)
    assert 1 <= max(alive) <= 2 and len(live) == 0
    before = happens_before(log)
    work = {payload: n for n, (op, k, payload) in enumerate(log) if op == "work"}
    halves = walk(depth)
    for k, half in enumerate(halves):
        for older in halves[:max(k - 1, 0)]:
            assert before(work["grads", *older], work["rebuild", *half]), (older, half)
        if k:  # ... and the one just before it may overlap (the pipeline's point)
            assert not before(work["grads", *halves[k - 1]], work["rebuild", *half])


def test_reprop_and_backprop_use_no_streams(monkeypatch):
    monkeypatch.setattr(streams, "streams_for", lambda device: pytest.fail("streams used"))
    stack, inputs = make(2)
    grads(stack, inputs, "reprop")
    grads(stack, inputs, "backprop")


def test_cpu_streams_are_in_order():
    assert isinstance(streams.streams_for(torch.device("cpu")), streams.InOrderStreams)
    assert not isinstance(streams.streams_for(torch.device("cpu")), streams.CudaStreams)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("depth", (1, 3, 4))
def test_pareprop_on_cuda_streams(depth):
    stack, inputs = make(depth)
    stack.cuda()
    inputs = [t.cuda().detach().requires_grad_(t.requires_grad) for t in inputs[:2]] + [
        inputs[2].cuda(), inputs[3].cuda().detach(), {"scale": inputs[4]["scale"].cuda().detach()}]
    _, want = grads(stack, inputs, "backprop")
    for mode in ("reprop", "pareprop"):
        _, got = grads(stack, inputs, mode)
        for name in want:
            assert rel_err(got[name], want[name]) <= 1e-9, (mode, name)


# --- autograd integration and errors ---


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_autograd_grad_is_a_clear_error(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(2)
    loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode))
    with pytest.raises(RuntimeError, match=r"autograd\.grad.*loss\.backward\(\)"):
        torch.autograd.grad(loss, [x1])
    loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode))
    with pytest.raises(RuntimeError, match="inputs="):
        loss.backward(inputs=[x1])


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_autograd_grad_works_with_frozen_parameters(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(3)
    stack.requires_grad_(False)
    results = []
    for m in ("backprop", mode):
        loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=m))
        results.append(torch.autograd.grad(loss, [x1, x2]))
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) <= 1e-9


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_double_backward_is_a_clear_error(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(2)
    loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode))
    with pytest.raises(RuntimeError, match="double backward"):
        loss.backward(create_graph=True)
    stack.zero_grad(set_to_none=True)  # break the create_graph reference cycles


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_no_grad_forward_matches(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(3)
    want = stack(x1, x2, mask, pos, per_layer=per_layer, mode="backprop")
    with torch.no_grad():
        got = stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode)
    assert not got[0].requires_grad
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-12


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_outputs_modified_in_place_are_caught(mode):
    stack, (x1, x2, mask, pos, per_layer) = make(2)
    y1, y2 = stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode)
    y1.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        loss_fn(y1, y2).backward()


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_autocast_state_is_replayed_in_backward(mode):
    seen = []

    class Probe(G):
        def forward(self, x, *shared, **per_layer):
            seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
            return super().forward(x)

    stack = revtorch.RevStack(Probe, Probe, depth=2).float()
    x1, x2 = torch.randn(2, 3, DIM, requires_grad=True), torch.randn(2, 3, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = stack(x1, x2, mode=mode)
    (y1.float().sum() + y2.float().sum()).backward()
    assert len(seen) == 8 and all(amp for amp, _ in seen)
    assert [grad for _, grad in seen] == [False] * 4 + [True] * 4


def x_pair(shape1=(2, 3, DIM), shape2=(2, 3, DIM), dtype2=torch.float64):
    return torch.randn(*shape1, dtype=torch.float64), torch.randn(*shape2, dtype=dtype2)


def layers(depth=2, f=F, g=G):
    return [f().double() for _ in range(depth)], [g().double() for _ in range(depth)]


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_input_errors(mode):
    fs, gs = layers()
    mask, pos = torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, DIM, dtype=torch.float64)
    scale = {"scale": torch.ones(2, DIM, dtype=torch.float64)}
    ok = dict(shared=(mask, pos), per_layer=scale, mode=mode)
    with pytest.raises(ValueError, match="shape"):
        revtorch.reversible(fs, gs, *x_pair(shape2=(2, 4, DIM)), **ok)
    with pytest.raises(ValueError, match="dtype"):
        revtorch.reversible(fs, gs, *x_pair(dtype2=torch.float32), **ok)
    with pytest.raises(TypeError, match="tensors"):
        revtorch.reversible(fs, gs, [1.0], [1.0], **ok)
    with pytest.raises(ValueError, match="depth"):
        revtorch.reversible([], [], *x_pair(), **ok)
    with pytest.raises(ValueError, match="one F and one G"):
        revtorch.reversible(fs, gs[:1], *x_pair(), **ok)
    with pytest.raises(TypeError, match="nn.Module"):
        revtorch.reversible([lambda x: x] * 2, gs, *x_pair(), **ok)
    with pytest.raises(TypeError, match="shared"):
        revtorch.reversible(fs, gs, *x_pair(), shared=(mask, 1.0), per_layer=scale, mode=mode)
    with pytest.raises(ValueError, match="leading axis 2"):
        bad = {"scale": torch.ones(3, DIM, dtype=torch.float64)}
        revtorch.reversible(fs, gs, *x_pair(), shared=(mask, pos), per_layer=bad, mode=mode)
    revtorch.reversible(fs, gs, *x_pair(), **ok)  # and the good call runs


@pytest.mark.parametrize("mode", ["", "Reprop", "checkpoint", None])
def test_unknown_mode(mode):
    fs, gs = layers()
    with pytest.raises(ValueError, match="unknown mode"):
        revtorch.reversible(fs, gs, *x_pair(), mode=mode)


class Counter(nn.Module):
    """Adds a constant, counting its calls in a buffer: state updated during a call."""

    def __init__(self, reassign=False):
        super().__init__()
        self.reassign = reassign
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, *shared, **per_layer):
        if self.reassign:
            self.calls = self.calls + 1
        else:
            self.calls += 1
        return torch.ones_like(x)


class Shrink(nn.Module):
    def forward(self, x, *shared, **per_layer):
        return x[..., :1]


@pytest.mark.parametrize("mode", revtorch.MODES)
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(3)), "BatchNorm1d in training"),
        (lambda: nn.Dropout(0.1), "Dropout"),
        (lambda: Counter(), "changed a registered buffer"),
        (lambda: Counter(reassign=True), "changed a registered buffer"),
        (Shrink, "must return a tensor of shape"),
    ],
)
def test_stateful_or_misshapen_layers_are_refused(mode, bad, match):
    x1, x2 = x_pair()
    for fs, gs in ((bad, G), (F, bad)):
        stack = revtorch.RevStack(fs, gs, depth=2).double()
        with pytest.raises(ValueError, match=match):
            mask, pos = torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, DIM, dtype=torch.float64)
            scale = torch.ones(2, DIM, dtype=torch.float64)
            stack(x1, x2, mask, pos, per_layer={"scale": scale}, mode=mode)


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_batchnorm_and_dropout_without_state_updates_are_fine(mode):
    class NormDrop(nn.Module):
        def __init__(self, track=True):
            super().__init__()
            self.bn, self.drop = nn.BatchNorm1d(3, track_running_stats=track), nn.Dropout(0.5)

        def forward(self, x, *shared, **per_layer):
            return self.drop(self.bn(x))

    x1, x2 = x_pair()
    x1.requires_grad_()
    evaluated = revtorch.RevStack(NormDrop, NormDrop, depth=2).double().eval()
    loss_fn(*evaluated(x1, x2, mode=mode)).backward()
    batch_stats = revtorch.RevStack(lambda: NormDrop(track=False), G, depth=2).double()
    batch_stats.f.apply(lambda m: m.eval() if isinstance(m, nn.Dropout) else None)
    loss_fn(*batch_stats(x1, x2, mode=mode)).backward()  # batch statistics, no running state


# --- the CUDA audit on CPU: host synchronisations and the caching allocator's stream rule ---


class AuditStreams(RecordingStreams):
    """RecordingStreams that also know the stream the host is enqueuing on (``current``)."""

    def __init__(self):
        super().__init__()
        self.current = streams.CALLER

    @contextlib.contextmanager
    def on(self, k, label):
        self.log.append(("work", k, label))
        self.current, before = k, self.current
        try:
            yield
        finally:
            self.current = before


def _ptr(t):
    """The address of the storage under ``t`` (views and slices share it)."""
    return t.untyped_storage().data_ptr()


_SCALAR_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item")


class _Ledger(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op run during the backward (autograd's own included): which stream allocated
    each storage (by address) and which streams read it; ops that read a value on the
    host. Every output is held, so no address is reused while it records."""

    def __init__(self, recorded):
        super().__init__()
        self.streams, self.made, self.read, self.syncs, self.alive = recorded, {}, set(), [], []
        self.readers = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        k = self.streams.current
        if func.__name__.split(".")[0] in _SCALAR_OPS:
            self.syncs.append(func.__name__)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        ins = [t for t in leaves if isinstance(t, torch.Tensor) and t.numel()]
        out = func(*args, **kwargs)
        for t in ins if not func.is_view else ():  # a view reads nothing on the device
            self.read.add((_ptr(t), k))
            self.readers.setdefault((_ptr(t), k), func.__name__)
        old = {_ptr(t) for t in ins}  # views and in-place results allocate nothing
        for t in torch.utils._pytree.tree_leaves(out) if not func.is_view else ():
            if isinstance(t, torch.Tensor) and t.numel() and _ptr(t) not in old:
                self.made[_ptr(t)] = k
                self.alive.append(t)
        return out


_HOST_READS = [(torch.Tensor, n) for n in
               ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")]
_HOST_READS += [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                (torch.cuda.Event, "query"), (torch.cuda.Stream, "synchronize"),
                (torch.cuda.Stream, "query")]


def audit_pareprop(depth, monkeypatch, anchor_every=None):
    """Run a pareprop backward with AuditStreams and the ledger; (streams, ledger, host calls,
    stack, inputs). Host calls are the Python-level reads listed in ``_HOST_READS`` made while
    ``_pareprop`` runs."""
    made, host, inside = [], [], [False]

    def streams_for(device):
        made.append(AuditStreams())
        return made[-1]

    for owner, name in _HOST_READS:
        original = getattr(owner, name)

        def spy(*args, _original=original, _name=f"{owner.__name__}.{name}", **kwargs):
            if inside[0]:
                host.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    pareprop = core._pareprop

    def watched(*args):
        with _Ledger(args[-1]) as ledger:
            inside[0] = True
            try:
                out = pareprop(*args)
            finally:
                inside[0] = False
        made.append(ledger)
        return out

    monkeypatch.setattr(streams, "streams_for", streams_for)
    monkeypatch.setattr(core, "_pareprop", watched)
    stack, inputs = make(depth)
    stack.anchor_every = anchor_every
    grads(stack, inputs, "pareprop")
    recorded, ledger = made
    return recorded, ledger, host, stack, inputs


@pytest.mark.parametrize("depth", (1, 3))
def test_pareprop_backward_makes_no_host_sync(depth, monkeypatch):
    """No op in the pareprop backward reads a device value on the host: no ``.item()``,
    ``bool``/``int``/``float`` of a tensor, ``.tolist()``, ``.cpu()``, ``nonzero``, no stream,
    event or device synchronisation; the only waits are device-side event waits."""
    recorded, ledger, host, _, _ = audit_pareprop(depth, monkeypatch)
    assert host == [] and ledger.syncs == []
    assert ledger.read  # the ledger did see the backward's ops
    assert {op for op, _, _ in recorded.log} <= {"work", "record", "wait", "keep"}


@pytest.mark.parametrize("anchor_every", (None, 1, 2))
@pytest.mark.parametrize("depth", (1, 2, 3, 5))
def test_pareprop_keeps_every_tensor_it_hands_across_streams(depth, anchor_every, monkeypatch):
    """The caching allocator's rule, derived from the recorded schedule: a storage made on one
    stream during the backward and read on another (or handed to the caller's stream as a
    result: dX1, dX2 and parameter ``.grad``) is ``keep``-ed (``record_stream``) for that
    stream, since the allocator would otherwise reuse it when the host drops it while the
    other stream still reads it. Storages made before the backward on the caller's stream and
    read on a work stream are kept too, unless they outlive the backward's final event wait
    (parameters and the inputs the caller holds: X1, X2, the shared and per-layer inputs)."""
    recorded, ledger, _, stack, (x1, x2, mask, pos, per_layer) = audit_pareprop(
        depth, monkeypatch, anchor_every)
    kept = {(_ptr(t), k) for op, k, t in recorded.log if op == "keep"}
    held = [*stack.parameters(), x1, x2, mask, pos, *per_layer.values()]
    outlive = {_ptr(t) for t in held}
    work = {0, 1}
    crossings = 0
    for ptr, k in ledger.read:
        maker = ledger.made.get(ptr, "before")
        if maker == k or k not in work and maker == streams.CALLER:
            continue
        if maker == "before" and ptr in outlive:
            continue
        crossings += 1
        assert (ptr, k) in kept, (ledger.readers[ptr, k], maker, k)
    results = [x1.grad, x2.grad] + [p.grad for p in stack.parameters()]
    for t in results:
        if ledger.made.get(_ptr(t), streams.CALLER) in work:
            assert (_ptr(t), streams.CALLER) in kept
    assert crossings >= (2 if depth == 1 else 4)  # y1, y2, dY1, dY2 at least; x1, x2 per layer


def test_core_modules_import_downwards():
    """rebuild -> core -> numerics, streams: no module imports one above it (no cycles)."""
    import ast
    import importlib.util
    from pathlib import Path

    above = {"numerics": {"core", "rebuild", "stack"}, "streams": {"core", "rebuild", "stack"},
             "core": {"rebuild", "stack"}, "rebuild": {"stack"}}
    for name, banned in above.items():
        source = importlib.util.find_spec(f"revtorch.{name}").origin
        tree = ast.parse(Path(source).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    for a in n.names} | {
            (n.module or "").split(".")[-1] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)}
        assert not imported & banned, (name, imported & banned)
