"""The experiments: benchmarks, training runs and one-off probes of revjax and revtorch.

Grouped by job, each package importing downwards only (no cycles; nothing here imports
``tests`` or ``parity_tests``)::

    common.py   helpers every experiment shares: timing, tables, environment, atomic writes
    train/      the training CLI (``python -m experiments.train``), its data, sweep and report
    probes/     one-off measurements (numerics, overlap, gpu_compile, parity, profiles, ...)
    bench/      the benchmark suite (``python -m experiments.bench``), which also runs the
                probes as sub-commands
"""
