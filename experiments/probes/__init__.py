"""One-off probes, each ``python -m experiments.probes.<name>`` or a sub-command of
``python -m experiments.bench``: ``numerics`` (rebuild drift per dtype), ``overlap`` (GPU
stream overlap from profiler traces), ``gpu_compile`` (every family compiled for an H200
without a GPU), ``parity`` (the cross-framework comparison the parity tests use) and
``parity_report``, ``profile_modes`` and ``pareprop_cpu`` (where each mode spends its time
on XLA:CPU), ``xla_cpu_overlap`` (does XLA:CPU run independent work at once),
``param_counts``.
"""
