"""Run under torchrun by tests/test_train_cli_torch_dist.py (not a test module itself):
the training CLI (``experiments.train.cli``) with ``--framework torch``, ``--parallel dp`` and
``fsdp`` in every mode, an MLM run under DDP, a stopped and resumed run of each, a resume
with another process count and a non-finite loss on one rank's shard. Every rank records
what ``cli.main`` returned."""

import json
import os
import shutil
import sys

import torch

# Run as a script, this folder comes first on sys.path, where tests/revtorch would shadow the
# revtorch package: the repository root goes before it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.train import cli, torch_cli  # noqa: E402
from experiments.train import data as data_lib  # noqa: E402


def few_docstrings() -> dict:
    """A few docstrings instead of parsing the whole standard library (speed)."""
    return {f"mod{i}.py": (json.__doc__ + cli.__doc__).encode() for i in range(12)}


def main(root: str, base: list[str], nan_data: str, mlm: list[str]) -> None:
    rank = int(os.environ["RANK"])
    rc = {}
    # MLM: the ranks' shards hold different numbers of predicted tokens (loss_weight)
    data_lib.stdlib_docstrings = few_docstrings
    rc["mlm"] = cli.main(mlm + ["--parallel", "dp", "--out", f"{root}/mlm"])
    for par in ("dp", "fsdp"):
        for mode in ("backprop", "reprop", "pareprop"):
            rc[f"{par}_{mode}"] = cli.main(base + ["--parallel", par, "--mode", mode,
                                                   "--out", f"{root}/{par}_{mode}"])
        split = base + ["--parallel", par, "--mode", "pareprop", "--out", f"{root}/{par}_split"]
        rc[f"{par}_stopped"] = cli.main(split + ["--stop-after", "2"])
        rc[f"{par}_resumed"] = cli.main(split + ["--resume"])
    # a checkpoint written by 3 processes (its RNG states say so) is refused by 2
    three = f"{root}/three"
    if rank == 0:
        shutil.copytree(f"{root}/dp_split", three)
        path = torch_cli.checkpoints(three)[-1][1]
        ck = torch.load(path, weights_only=True)
        ck["rng"]["ranks"].append(ck["rng"]["ranks"][0])
        torch.save(ck, path)
        os.unlink(f"{three}/summary.json")
    torch.distributed.barrier()
    rc["three"] = cli.main(base + ["--parallel", "dp", "--mode", "pareprop", "--out", three,
                                   "--resume"])
    # a NaN image in rank 1's shard of step 3's batch stops both ranks
    nan = [a if a != "digits" else "npz" for a in base] + ["--data-path", nan_data]
    rc["nan"] = cli.main(nan + ["--parallel", "dp", "--steps", "5", "--ckpt-every", "1",
                                "--out", f"{root}/nan"])
    with open(f"{root}/rc_{rank}.json", "w") as f:
        json.dump(rc, f)
    torch_cli.leave(0)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
