"""The benchmark suite: ``python -m experiments.bench`` (see ``experiments/bench/cli.py``).

Modules, lowest first: ``cells`` (a measurement's config), ``results`` (the cells file),
``measure_jax`` / ``measure_torch`` (one cell in each framework), ``report`` (tables and
plots), ``grid`` (running a grid of cells), ``demo`` (``make demo``), ``cli`` (the command
line, with the probes as sub-commands).
"""
