"""One cell in PyTorch: what the forward keeps for the backward (CPU, ``torch.profiler``) or
the device's peak (CUDA), and the training step (speed)."""

from __future__ import annotations

from typing import Callable

from experiments.bench.cells import REMAT, Cell, variant_config


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


def memory(cell: Cell) -> dict:
    import torch

    from revtorch import train

    model, step, batch, task = _setup(cell)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if cell.backend == "gpu":
        step()  # optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"device_peak_bytes": torch.cuda.max_memory_allocated(),
                "state_bytes": 4 * state_bytes}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = train.compute_loss(model, batch, task=task, mode=None)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    del loss  # what the forward kept is counted; the backward itself is not needed
    # parameters, their gradients and AdamW's two moments, next to what the forward keeps
    return {"kept_bytes": kept, "state_bytes": 4 * state_bytes,
            "total_bytes": kept + 4 * state_bytes}


def runner(cell: Cell) -> Callable[[], None]:
    """One training step of ``cell`` per call, blocking until it is done."""
    import torch

    _, step, _, _ = _setup(cell)
    sync = torch.cuda.synchronize if cell.backend == "gpu" else (lambda: None)
    return lambda: (step(), sync())
