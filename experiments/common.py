"""Helpers every experiment shares: timing, tables, environment record, atomic writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Sequence


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int = 2,
                        reps: int = 7) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin so that drifts in machine
    load hit every entry alike. Each function must block until its result is ready."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def cores_busy(fn: Callable[[], object], calls: int) -> float:
    """Process CPU seconds per wall second over ``calls`` calls of ``fn`` (which must block
    until its result is ready): about 1 when one core works and the others idle, about the
    core count when every core is kept busy."""
    import resource

    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        fn()
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall


def rel_err(got, want) -> float:
    """``max|got - want| / max|want|`` (the project's tensor comparison), in float64."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def environment() -> dict:
    """Versions and machine, recorded beside every result."""
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": os.cpu_count(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        import jax

        env["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 (recording only)
        pass
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return env


def atomic_write_json(path: str, payload: dict) -> None:
    """Write JSON to ``path`` via a temporary file and rename: never a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
