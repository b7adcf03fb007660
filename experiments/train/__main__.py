"""``python -m experiments.train`` (also under ``torchrun``): the training command line."""

from experiments.train import cli, torch_cli

if __name__ == "__main__":
    torch_cli.leave(cli.main())  # under torchrun: a barrier, then a clean exit
