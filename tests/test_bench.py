"""The benchmark suite (``python -m experiments.bench``): cells, results file, report."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench  # noqa: E402
import report  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cell(**kw):
    base = dict(kind="memory", framework="jax", backend="cpu", model="vit-test",
                method="reprop", batch=2)
    return bench.Cell(**{**base, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(framework="mxnet"), "framework must be one of"),
    (dict(framework="torch", backend="gpu-compile"), "not one of torch's"),
    (dict(method="fast"), "method must be one of"),
    (dict(method="pareprop+streams"), "method must be one of"),
    (dict(kind="speed", backend="gpu-compile"), "memory only"),
    (dict(batch=0), "must be positive"),
    (dict(depth=0), "must be positive"),
    (dict(dtype="int8"), "dtype must be"),
])
def test_bad_cells_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        bench.check_cell(_cell(**kw))


def test_cells_name_the_model_mode_and_depth_they_run():
    swin = {"depths": (2, 2, 6, 2)}
    c = _cell(model="swin-t", method="reprop", depth=10, size=64)
    assert (c.name(), c.mode()) == ("rev-swin-t", "reprop")
    assert c.overrides(swin) == {"img_size": 64, "depths": (2, 2, 10, 2)}
    assert (_cell(method="remat").name(), _cell(method="remat").mode()) == ("vit-test",
                                                                           "backprop")
    assert _cell(method="rev-backprop").name() == "rev-vit-test"
    assert _cell(method="rev-backprop").mode() == "backprop"
    assert _cell(method="pareprop+streams", backend="gpu-compile").mode() == "pareprop"
    text = _cell(model="roberta-base", depth=3, size=128)
    assert text.overrides({"depth": 12}) == {"max_len": 128, "depth": 3}
    assert _cell().key != _cell(batch=3).key


def test_report_fits_slope_fixed_part_and_max_batch():
    cells = []
    for method, slope, fixed in [("standard", 100.0, 10.0), ("reprop", 5.0, 12.0)]:
        for b in (2, 4, 8):
            cells.append({**vars(_cell(method=method, batch=b)), "depth": None,
                          "total_bytes": (fixed + slope * b) * report.MiB})
    rows = {r["method"]: r for r in report.memory_table(cells, budget_gib=1.0)}
    for method, slope, fixed in [("standard", 100.0, 10.0), ("reprop", 5.0, 12.0)]:
        r = rows[method]
        assert r["MiB/sample"] == pytest.approx(slope) and r["fixed MiB"] == pytest.approx(fixed)
        assert r["max batch"] == int((1024 - fixed) // slope)
        assert fixed + slope * r["max batch"] <= 1024 < fixed + slope * (r["max batch"] + 1)
    assert rows["reprop"]["vs standard"] == pytest.approx(20.0)


def test_results_file_is_rewritten_whole(tmp_path):
    path = str(tmp_path / "cells.jsonl")
    bench.record(path, _cell(), {"total_bytes": 1}, {})
    bench.record(path, _cell(batch=3), {"total_bytes": 2}, {})
    bench.record(path, _cell(), {"total_bytes": 3}, {})  # the same cell measured again
    rows = bench.load(path)
    assert [(r["batch"], r["total_bytes"]) for r in rows] == [(3, 2), (2, 3)]
    assert os.listdir(tmp_path) == ["cells.jsonl"]


def test_memory_speed_report_end_to_end_and_resume(tmp_path):
    """Real measurements of the smallest config: the reversible modes' memory per sample is
    below the standard twin's in both frameworks, torch's remat below plain autograd, a rerun
    measures nothing again, and the report draws its figures."""
    out = str(tmp_path / "bench")
    common = ["--models", "vit-test", "--size", "16", "--batches", "1", "3"]
    bench.main(["--results", out, "memory", "--methods", "standard", "reprop", *common])
    bench.main(["--results", out, "memory", "--frameworks", "torch", "--methods", "standard",
                "remat", "reprop", "pareprop", *common])
    bench.main(["--results", out, "speed", "--frameworks", "jax", "torch", "--methods",
                "standard", "pareprop", "--models", "vit-test", "--size", "16", "--batches",
                "2", "--warmup", "1", "--reps", "2"])
    first = bench.load(os.path.join(out, "cells.jsonl"))
    assert len(first) == 4 + 8 + 4 and not [r for r in first if "error" in r]
    bench.main(["--results", out, "memory", "--methods", "standard", "reprop", *common])
    assert bench.load(os.path.join(out, "cells.jsonl")) == first  # resumed: nothing redone
    assert all(r["env"]["python"] and r["date"] for r in first)

    report.main(["--results", out])
    per_sample = {(r["framework"], r["method"]): r["MiB/sample"]
                  for r in report.memory_table(first, 80)}
    assert per_sample["jax", "reprop"] < per_sample["jax", "standard"]
    assert per_sample["torch", "reprop"] < per_sample["torch", "standard"]
    assert per_sample["torch", "pareprop"] < per_sample["torch", "standard"]
    assert per_sample["torch", "remat"] < per_sample["torch", "standard"]
    speed = report.speed_table(first)
    assert {r["where"] for r in speed} == {"jax CPU", "torch CPU"}
    assert all(r["standard /s"] > 0 and r["pareprop /s"] > 0 for r in speed)
    files = set(os.listdir(out))
    assert {"cells.jsonl", "report.md", "memory_vs_batch.png", "throughput_vs_batch.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    with open(os.path.join(out, "report.md")) as f:
        assert "Memory per sample" in f.read()


def test_max_batch_speed_cells_come_from_the_memory_cells(tmp_path):
    out = str(tmp_path)
    path = os.path.join(out, "cells.jsonl")
    for b in (2, 4):  # synthetic memory cells: 1 MiB fixed + 2 MiB per sample
        bench.record(path, _cell(method="reprop", batch=b, size=16),
                     {"total_bytes": (1 + 2 * b) * report.MiB}, {})
    args = bench.parser().parse_args(["--results", out, "speed", "--methods", "reprop",
                                      "standard", "--size", "16", "--max-batch-gib",
                                      str(21 / 1024)])
    args.results_file = path
    (cell,) = bench._grid(args, "speed")  # standard has no memory cells: no max-batch cell
    assert (cell.method, cell.batch) == ("reprop", 10)


def test_gpu_script_parses_and_documents_smoke():
    script = os.path.join(ROOT, "experiments", "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    with open(script) as f:
        text = f.read()
    assert "--smoke" in text and "status.txt" in text


def test_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        bench.main(["memory", "--methods", "fastest"])
    assert "invalid choice" in capsys.readouterr().err


def test_report_of_an_empty_folder_writes_an_empty_report(tmp_path):
    assert report.main(["--results", str(tmp_path)]) == 0
    with open(tmp_path / "report.md") as f:
        assert f.read().startswith("# Benchmark results (0 cells)")
    assert json.loads(json.dumps(bench.load(str(tmp_path / "cells.jsonl")))) == []


def test_other_experiments_run_as_sub_commands(monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("fake_experiment")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fake_experiment", fake)
    monkeypatch.setitem(bench.SUBCOMMANDS, "fake", ("fake_experiment", "a test double"))
    assert bench.main(["fake", "--x", "1"]) == 3
    assert bench.main(["--results", "somewhere", "fake", "--smoke"]) == 3
    assert calls == [["--x", "1"], ["--smoke"]]
    assert set(bench.SUBCOMMANDS) >= {"numerics", "overlap", "gpu-compile", "parity"}
