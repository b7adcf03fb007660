"""The experiments' shared helpers: atomic result files and the HLO statistics that the
profiling harness reports. The experiments themselves are benchmarks, not tests."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from experiments import common
from experiments.probes import profile_modes


def test_atomic_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out" / "results.json"
    common.atomic_write_json(str(path), {"rows": [1, 2]})
    common.atomic_write_json(str(path), {"rows": [3]})
    assert json.loads(path.read_text()) == {"rows": [3]}
    assert os.listdir(path.parent) == ["results.json"]


def test_atomic_write_json_leaves_nothing_half_written(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    path = tmp_path / "results.json"
    common.atomic_write_json(str(path), {"rows": [1]})
    with pytest.raises(RuntimeError, match="cannot serialise"):
        common.atomic_write_json(str(path), {"rows": [1] * 1000 + [Unprintable()]})
    assert json.loads(path.read_text()) == {"rows": [1]}  # the old file, intact
    assert os.listdir(tmp_path) == ["results.json"]  # and no temporary left behind


def test_shape_bytes_sums_tuple_leaves():
    assert profile_modes.shape_bytes("(f32[2,3]{1,0}, bf16[4], s32[])") == 24 + 8 + 4


def test_loop_stats_find_the_scan_body_and_its_matmuls():
    def f(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w) @ w, None), x, ws)[0]

    x, ws = jnp.ones((4, 8)), jnp.ones((5, 8, 8))
    hlo = jax.jit(f).lower(x, ws).compile().as_text()
    stats = profile_modes.loop_stats(hlo)
    assert stats["loop dots"] == 2
    assert stats["carried buffers"] >= 2  # the carry and the stacked weights (at least)
    assert stats["carried MiB"] > 0
    assert profile_modes.loop_stats(jax.jit(jnp.sin).lower(x).compile().as_text()) == {}


def test_cores_busy_is_cpu_time_per_wall_time(monkeypatch):
    """The ratio on fixed clocks (a timed lower bound would fail on a loaded machine: the
    first CI run of this test got 0.48 of a core while the other xdist worker compiled)."""
    import resource
    import time
    import types

    clock, cpu, calls = [10.0], [3.0], []
    usage = lambda who: types.SimpleNamespace(ru_utime=cpu[0], ru_stime=cpu[0] / 2)

    def work():  # each call: 0.5 s of wall time, 1.0 s user + 0.5 s system CPU time
        calls.append(1)
        clock[0] += 0.5
        cpu[0] += 1.0

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(resource, "getrusage", usage)
    assert common.cores_busy(work, calls=4) == pytest.approx(3.0)
    assert len(calls) == 4
    monkeypatch.undo()
    # on the real clocks: a process that sleeps keeps no core busy for long
    busy = common.cores_busy(lambda: time.sleep(0.05), calls=4)
    assert 0.0 <= busy < (os.cpu_count() or 1) + 0.5
