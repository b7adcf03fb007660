"""The GPU overlap check (experiments/probes/overlap.py): its interval arithmetic on synthetic
kernels, its readers on synthetic traces, and a CPU smoke run of the command."""

import json
import os
import subprocess
import sys

import pytest

from experiments.probes import overlap as ov

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_union_merges_nested_overlapping_and_touching_intervals():
    assert ov.union([(5, 7), (0, 2), (1, 3), (0.5, 1), (3, 4), (9, 9)]) == [(0, 4), (5, 7)]
    assert ov.busy([(0, 10), (2, 3), (8, 12)]) == 12  # nested and overlapping count once
    assert ov.busy([]) == 0


@pytest.mark.parametrize("a, b, want", [
    ([(0, 10)], [(2, 3)], 1),                  # nested
    ([(0, 2)], [(3, 5)], 0),                   # disjoint
    ([(0, 2)], [(2, 5)], 0),                   # touching: no common time
    ([(0, 4), (6, 10)], [(3, 7)], 2),          # one spans a gap of the other
    ([(0, 1), (1, 2), (2, 3)], [(0.5, 2.5)], 2),  # touching pieces on one stream
    ([(0, 3), (1, 2)], [(0, 3)], 3),           # a stream's own overlaps count once
])
def test_overlap_of_two_streams(a, b, want):
    assert ov.overlap(a, b) == pytest.approx(want)
    assert ov.overlap(b, a) == pytest.approx(want)


def test_stream_overlap_picks_the_two_busiest_streams_and_the_shorter_one():
    streams = {"7": [(0, 1)], "13": [(0, 10)], "14": [(5, 9), (20, 22)]}
    got = ov.stream_overlap(streams, layer_steps=2)
    assert got["busy"] == {"7": 1, "13": 10, "14": 6}
    assert got["pair"] == ["13", "14"]
    assert got["overlap"] == 4 and got["share"] == pytest.approx(4 / 6)
    assert got["overlap_per_layer_step"] == 2
    assert got["pairs"] == {"13|14": 4, "13|7": 1, "14|7": 0}
    assert got["ratio"] == pytest.approx(12 / 17)  # busy [0, 10] and [20, 22] of 1 + 10 + 6
    one = ov.stream_overlap({"13": [(0, 10)]}, layer_steps=2)
    assert one["overlap"] is None and one["share"] is None and one["ratio"] == 1.0


def test_per_step_clips_kernels_to_each_step():
    streams = {"a": [(0, 4), (10, 14)], "b": [(2, 6), (10, 11)]}
    steps = ov.per_step(streams, [(0, 8), (9, 15)], layer_steps=1)
    assert [s["overlap"] for s in steps] == [2, 1]
    assert [s["share"] for s in steps] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert [s["ratio"] for s in steps] == [pytest.approx(6 / 8), pytest.approx(4 / 5)]


def _line(i, name, spans):
    events = "".join(f"events {{ metadata_id: 1 offset_ps: {s * 1000} duration_ps: "
                     f"{(e - s) * 1000} }} " for s, e in spans)
    return f'lines {{ id: {i} name: "{name}" timestamp_ns: 0 {events}}} '


def test_jax_reader_finds_stream_lines_and_steps_on_a_gpu_plane():
    from jax.profiler import ProfileData

    gpu = ('planes { id: 1 name: "/device:GPU:0" ' + _line(1, "Stream #13(compute)", [(0, 50)])
           + _line(2, "Stream #14(compute)", [(20, 60)]) + _line(3, "XLA Modules", [(0, 70)])
           + _line(4, "XLA Ops", [(0, 60)])
           + 'event_metadata { key: 1 value { id: 1 name: "k" } } } ')
    host = 'planes { id: 2 name: "/host:CPU" ' + _line(1, "python", [(0, 5)]) + "}"
    streams, windows, lines, planes = ov.jax_streams(ProfileData.from_text_proto(gpu + host))
    assert streams == {"/device:GPU:0/13": [(0, 50)], "/device:GPU:0/14": [(20, 60)]}
    assert windows == [(0, 70)] and lines == 4
    assert planes == {"/device:GPU:0": 4, "/host:CPU": 1}
    assert ov.per_step(streams, windows, 1)[0]["share"] == pytest.approx(30 / 40)


def test_torch_reader_groups_kernels_by_stream(tmp_path):
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 10, "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 5, "dur": 10, "args": {"stream": 21}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 30, "args": {}},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "overlap_step", "ts": 0, "dur": 20},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 0, "args": {"stream": 9}},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    streams, windows, kernels = ov.torch_streams(str(path))
    assert streams == {"7": [(0.0, 10.0)], "21": [(5.0, 15.0)]}
    assert windows == [(0.0, 20.0)] and kernels == 2


def test_cpu_smoke_run_reports_no_streams(tmp_path):
    """The command end to end on CPU: traces are taken and read, no GPU stream is found, and
    the overlap is null with the reason, never a number."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "overlap", "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads((tmp_path / "overlap.json").read_text())
    assert payload["config"]["model"] == "rev-vit-test" and payload["config"]["img"] == 16
    for key in ("jax", "jaxlib", "torch", "python"):
        assert payload["environment"][key]
    assert set(payload["results"]) == {"jax", "torch"}
    for name, result in payload["results"].items():
        assert result["overlap"] is None and result["share"] is None, name
        assert result["ratio"] is None, name
        assert result["reason"].startswith("no GPU streams found"), name
        assert result["streams"] == [] and result["steps"] == []
    assert payload["results"]["jax"]["events_per_plane"]["/host:CPU"] > 0  # the trace was read
    assert payload["results"]["torch"]["cpu_events"] > 0
    assert "no GPU streams found" in proc.stdout
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
