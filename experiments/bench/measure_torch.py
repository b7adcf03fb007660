"""One cell in PyTorch: the peak of live allocated bytes over the training loss's gradient
computation (memory: the CPU allocator through ``torch.profiler``, or the CUDA allocator's
peak), and the training step (speed)."""

from __future__ import annotations

import gc
from typing import Callable

from experiments.bench.cells import REMAT, Cell, variant_config

# the range that marks the backward in the profile (kept bytes are the live bytes at its start)
BACKWARD = "bench.backward"


def _setup(cell: Cell):
    import torch

    import revtorch
    from revtorch import train

    device = torch.device("cuda" if cell.backend == "gpu" else "cpu")
    over = cell.overrides(variant_config("torch", cell.model))
    if cell.dtype != "float32":
        over["dtype"] = getattr(torch, cell.dtype)
    torch.manual_seed(0)
    model = revtorch.models.build(cell.name(), mode=cell.mode(), **over).to(device).train()
    if cell.method in REMAT:
        revtorch.set_remat(model, REMAT[cell.method])
    opt, sched = train.make_optimizer(model, 1e-4, total_steps=1000)
    g = torch.Generator().manual_seed(1)
    b, n = cell.batch, cell.size
    if cell.text:
        ids = torch.randint(0, model.config.vocab_size, (b, n), generator=g)
        labels = torch.where(torch.rand(b, n, generator=g) < 0.15, ids, -100)
        batch = (ids, labels, torch.ones(b, n, dtype=torch.bool))
    else:
        batch = (torch.randn(b, 3, n, n, generator=g),
                 torch.randint(0, model.config.num_classes, (b,), generator=g))
    batch = tuple(t.to(device) for t in batch)
    task = "mlm" if cell.text else "classification"
    step = lambda: train.scheduled_train_step(model, opt, sched, batch, task=task)
    return model, step, batch, task


def _gradients(model, batch, task: str) -> None:
    """The gradient computation a memory cell measures: gradients cleared (``None``), the
    training loss's forward, its backward (inside the ``BACKWARD`` range); the parameters'
    ``.grad`` stay allocated, everything else is freed on return."""
    from torch.profiler import record_function

    from revtorch import train

    model.zero_grad(set_to_none=True)
    loss = train.compute_loss(model, batch, task=task, mode=None)
    with record_function(BACKWARD):
        loss.backward()
    del loss


def live_bytes(prof, apart=()) -> tuple[int, int, int]:
    """(peak, at the start of ``BACKWARD``, peak without ``apart``) of the live bytes the CPU
    allocator handed out inside the profiled window, from the profile's allocation events
    (``profile_memory``): each allocation adds its size at its time, each free of a block
    allocated inside the window subtracts it (frees of older blocks are left out, so what
    existed before the window counts as zero). ``apart``: addresses of blocks still
    allocated at the end (the gradients), left out of the third figure."""
    from torch._C._profiler import _EventType

    allocs, mark, stack = [], None, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu":
                allocs.append((e.start_time_ns, f.ptr, f.alloc_size))
        elif e.name == BACKWARD and (mark is None or e.start_time_ns < mark):
            mark = e.start_time_ns
    if mark is None:
        raise RuntimeError(f"the profile has no {BACKWARD!r} range")
    allocs.sort(key=lambda a: a[0])
    last = {ptr: i for i, (_, ptr, size) in enumerate(allocs) if size > 0 and ptr in apart}
    kept_apart = set(last.values())  # never freed: alive at the end
    live, peak, kept, rest, rest_peak, blocks = 0, 0, None, 0, 0, {}
    for i, (t, ptr, size) in enumerate(allocs):
        if kept is None and t >= mark:
            kept = live
        if size > 0:
            blocks[ptr] = size
        elif blocks.pop(ptr, None) is None:
            continue  # allocated before the window
        live += size
        peak = max(peak, live)
        if i not in kept_apart:
            rest += size
            rest_peak = max(rest_peak, rest)
    return peak, live if kept is None else kept, rest_peak


def memory(cell: Cell) -> dict:
    """The peak of live allocated bytes over one gradient computation of the training loss
    (``peak_bytes``): everything allocated from its start to its end and alive at once —
    the forward's activations and the autograd graph's saved tensors, what the backward
    rebuilds or recomputes (a reversible layer's reconstruction, a checkpointed block),
    the backward's temporaries, and the parameters' gradients (``.grad``, cleared to None
    before); not the parameters, the batch or the optimizer state, which exist before.
    On CPU it is read from the CPU allocator's allocation events (``torch.profiler``,
    ``profile_memory``); on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``,
    minus the bytes allocated before. One unprofiled gradient computation runs first (lazy
    one-time allocations out of the figure).

    ``kept_bytes`` (CPU): the live bytes between forward and backward, what the forward
    keeps for the backward (at most the peak). ``activation_peak_bytes`` (CPU): the peak of
    the same live bytes without the parameters' gradients (which the backward allocates as
    it frees the activations; at small batch the gradients of a large model are the peak, in
    every method alike); plus the parameter bytes it is jax's accounting (gradients as
    outputs that exist throughout, the temporaries' peak). ``total_bytes``, the
    training-step figure the report fits over batch (as jax's gradient function with
    AdamW's moments): the peak plus the parameters, the batch and AdamW's two moments.
    ``device_peak_bytes`` (CUDA): the device's peak over a whole training step (the
    optimizer update's temporaries in it)."""
    import torch

    model, step, batch, task = _setup(cell)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"param_bytes": param_bytes,
           "batch_bytes": sum(t.numel() * t.element_size() for t in batch),
           "moments_bytes": 2 * param_bytes}
    if cell.backend == "gpu":
        step()  # optimizer state allocated, lazy initialisation done
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _gradients(model, batch, task)
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        _gradients(model, batch, task)  # warm-up
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _gradients(model, batch, task)
        grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters()
                 if p.grad is not None}
        out["peak_bytes"], out["kept_bytes"], out["activation_peak_bytes"] = live_bytes(
            prof, grads)
    out["total_bytes"] = (out["peak_bytes"] + out["param_bytes"] + out["batch_bytes"]
                          + out["moments_bytes"])
    return out


def runner(cell: Cell) -> Callable[[], None]:
    """One training step of ``cell`` per call, blocking until it is done."""
    import torch

    _, step, _, _ = _setup(cell)
    sync = torch.cuda.synchronize if cell.backend == "gpu" else (lambda: None)
    return lambda: (step(), sync())
