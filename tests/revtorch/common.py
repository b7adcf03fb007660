"""A generic F/G pair, the stack and inputs built from them, and the comparison of docs/conventions.md."""

import torch
from torch import nn

import revtorch
from revtorch.train import cross_entropy_loss

DIM = 8


class F(nn.Module):
    """LayerNorm + Linear, using a shared mask and position, and a per-layer scale."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask, pos, *, scale, **unused):
        h = self.proj(self.norm(x + pos)) * scale
        return torch.where(mask[..., None], h, torch.zeros_like(h))


class G(nn.Module):
    """LayerNorm + MLP with exact GELU; ignores the shared and per-layer inputs."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x, *shared, **per_layer):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x)), approximate="none"))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|``."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def make(depth, dtype=torch.float64, *, seed=0, batch=3, tokens=5, dim=DIM, mode="pareprop"):
    """(stack, inputs) with inputs = (x1, x2, mask, pos, per_layer); x1, x2, pos and the scale
    require grad so that a gradient leaking into shared/per-layer inputs would show."""
    torch.manual_seed(seed)
    stack = revtorch.RevStack(lambda: F(dim), lambda: G(dim), depth=depth, mode=mode).to(dtype)
    x1 = torch.randn(batch, tokens, dim, dtype=dtype, requires_grad=True)
    x2 = torch.randn(batch, tokens, dim, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, tokens) > 0.3
    pos = torch.randn(tokens, dim, dtype=dtype, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(depth, dim, dtype=dtype)).requires_grad_()
    return stack, (x1, x2, mask, pos, {"scale": scale})


def loss_fn(y1, y2):
    torch.manual_seed(123)
    w1, w2 = torch.randn_like(y1), torch.randn_like(y2)
    return (y1 * w1).sum() + (torch.tanh(y2) * w2).sum()


def grads(stack, inputs, mode):
    """Loss and gradients (every parameter, x1, x2) after ``loss.backward()`` in ``mode``."""
    x1, x2, mask, pos, per_layer = inputs
    stack.zero_grad(set_to_none=True)
    for t in (x1, x2, pos, *per_layer.values()):
        t.grad = None
    loss = loss_fn(*stack(x1, x2, mask, pos, per_layer=per_layer, mode=mode))
    loss.backward()
    out = {name: p.grad.clone() for name, p in stack.named_parameters()}
    out["x1"], out["x2"] = x1.grad.clone(), x2.grad.clone()
    return loss.detach(), out


def model_grads(model, images, labels, mode, seed=7):
    """Loss and gradients (every parameter and the images) in ``mode``; ``seed`` fixes the
    dropout keys the forward draws."""
    model.zero_grad(set_to_none=True)
    x = images.clone().requires_grad_()
    torch.manual_seed(seed)
    loss = cross_entropy_loss(model(x, mode=mode), labels)
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["images"] = x.grad.clone()
    return loss.detach(), out


def max_grad_err(got, want):
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k]) for k in want)


def saved_bytes(loss_fn, exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward while ``loss_fn()`` builds the loss,
    leaving out tensors that share storage with ``exclude`` (constants and inputs that are
    not activations); then runs the backward (the saved tensors are what it used)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in skip:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return total


def run_gloo_workers(worker, what: str, nprocs: int = 2, timeout: float = 300.0):
    """Run ``worker(rank, nprocs, store, out)`` in ``nprocs`` spawned processes (the workers
    init a gloo group from the file ``store``; rank 0 ``torch.save`` s its result to
    ``out``) and return that result. A worker that fails raises here; workers still running
    after ``timeout`` seconds are killed and raise ``TimeoutError`` naming ``what``."""
    import os
    import tempfile
    import time

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "result.pt")
        procs = mp.start_processes(worker, args=(nprocs, store, out), nprocs=nprocs,
                                   join=False)
        deadline = time.monotonic() + timeout
        while not procs.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                for p in procs.processes:
                    p.kill()
                raise TimeoutError(f"{what} workers did not finish within {timeout:.0f} s")
        return torch.load(out)
