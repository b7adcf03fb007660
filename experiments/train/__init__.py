"""Training on real data: ``python -m experiments.train`` (see ``experiments/train/cli.py``).

Modules, lowest first: ``data`` (the data sets), ``config`` (the settings and checks both
frameworks share), ``jax_cli`` / ``torch_cli`` (each framework's training loop), ``cli``
(the command line), ``sweep`` (``python -m experiments.train.sweep``: the no-accuracy-drop
cells) and ``report`` (``python -m experiments.train.report``: their tables and plots).
"""
