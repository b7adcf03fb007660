"""DistributedDataParallel (CPU, gloo, 2 processes): reprop/pareprop gradients, which are
accumulated inside the reversible backward, are all-reduced exactly like backprop's."""

import os

import torch
import torch.distributed as dist

import revtorch

from .common import run_gloo_workers


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = revtorch.models.build("rev-vit-test", depth=3).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(100 + rank)  # each rank its own batch
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = {}
    for mode in revtorch.MODES:
        model.zero_grad(set_to_none=True)
        ddp(x, mode=mode).square().sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()
    # Leave without running destructors: tearing down DDP's reducer frees the gloo process
    # group, whose destructor joins its worker thread while holding the GIL; a worker thread
    # still freeing a finished work item needs the GIL too, and the process hangs (seen under
    # load in CI, py-spy: ~ProcessGroupGloo -> std::thread::join). Every collective is done.
    os._exit(0)


def test_ddp_gloo_two_processes_all_modes_agree():
    grads = run_gloo_workers(_worker, "DDP")
    ref = grads["backprop"]
    for mode in ("reprop", "pareprop"):
        for name, g in grads[mode].items():
            err = ((g - ref[name]).abs().max() / ref[name].abs().max()).item()
            assert err <= 1e-9, (mode, name, err)
