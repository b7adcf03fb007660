"""The benchmark suite (``python -m experiments.bench``): cells, results file, report."""

import json
import os
import subprocess
import sys

import pytest

from experiments.bench import cli, demo, grid, report
from experiments.bench.cells import Cell, check_cell
from experiments.bench.results import load, record

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cell(**kw):
    base = dict(kind="memory", framework="jax", backend="cpu", model="vit-test",
                method="reprop", batch=2)
    return Cell(**{**base, **kw})


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
        check_cell(_cell(**kw))


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
    record(path, _cell(), {"total_bytes": 1}, {})
    record(path, _cell(batch=3), {"total_bytes": 2}, {})
    record(path, _cell(), {"total_bytes": 3}, {})  # the same cell measured again
    rows = load(path)
    assert [(r["batch"], r["total_bytes"]) for r in rows] == [(3, 2), (2, 3)]
    assert os.listdir(tmp_path) == ["cells.jsonl"]


def test_memory_speed_report_end_to_end_and_resume(tmp_path):
    """Real measurements of the smallest config: the reversible modes' memory per sample is
    below the standard twin's in both frameworks, torch's remat below plain autograd, a rerun
    measures nothing again, and the report draws its figures."""
    out = str(tmp_path / "bench")
    common = ["--models", "vit-test", "--size", "16", "--batches", "1", "3"]
    cli.main(["--results", out, "memory", "--methods", "standard", "reprop", *common])
    # torch's peak at 16 px is the patch embedding's backward in every method (all the
    # gradients allocated by then), the same per sample: at 32 px it is the layers'
    cli.main(["--results", out, "memory", "--frameworks", "torch", "--methods", "standard",
                "remat", "reprop", "pareprop", "--models", "vit-test", "--size", "32",
                "--batches", "2", "4"])
    cli.main(["--results", out, "speed", "--frameworks", "jax", "torch", "--methods",
                "standard", "pareprop", "--models", "vit-test", "--size", "16", "--batches",
                "2", "--warmup", "1", "--reps", "2"])
    first = load(os.path.join(out, "cells.jsonl"))
    assert len(first) == 4 + 8 + 4 and not [r for r in first if "error" in r]
    cli.main(["--results", out, "memory", "--methods", "standard", "reprop", *common])
    assert load(os.path.join(out, "cells.jsonl")) == first  # resumed: nothing redone
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


def test_torch_memory_is_the_peak_over_forward_and_backward():
    """torch memory cells on CPU (tiny ViT): the peak of live bytes over the gradient
    computation is above what the forward keeps (and within the gradients' bytes of the peak
    without them), grows with batch in every method, is below
    plain autograd's for reprop, and reprop's per sample stays flat from depth 2 to 4 while
    the standard twin's grows; the report fits the peak (``total_bytes``)."""
    import torch

    from experiments.bench import measure_torch
    from experiments.bench.cells import METHODS

    grid_ = [(m, 2) for m in METHODS] + [("standard", 4), ("reprop", 4)]
    cells = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only wait for each other
    try:
        for method, depth in grid_:
            for b in (2, 4):
                cells[method, depth, b] = measure_torch.memory(
                    _cell(framework="torch", method=method, batch=b, depth=depth, size=32))
    finally:
        torch.set_num_threads(threads)
    for (method, depth, b), r in cells.items():
        assert r["peak_bytes"] >= r["kept_bytes"] > 0, (method, depth, b)
        # the gradients (parameter-sized) are all of the difference
        assert r["activation_peak_bytes"] <= r["peak_bytes"] <= (
            r["activation_peak_bytes"] + r["param_bytes"])
        assert r["total_bytes"] == (r["peak_bytes"] + r["param_bytes"] + r["batch_bytes"]
                                    + 2 * r["param_bytes"])
        assert report.measure(r) == r["total_bytes"]
    slope = {}
    for method, depth in grid_:
        small, large = cells[method, depth, 2], cells[method, depth, 4]
        assert large["peak_bytes"] > small["peak_bytes"], (method, depth)
        slope[method, depth] = (large["peak_bytes"] - small["peak_bytes"]) / 2
    for depth in (2, 4):
        for b in (2, 4):
            assert cells["standard", depth, b]["peak_bytes"] > cells["reprop", depth, b][
                "peak_bytes"]
    assert slope["reprop", 4] <= 1.10 * slope["reprop", 2]
    assert slope["standard", 4] > 1.5 * slope["standard", 2]


def test_max_batch_speed_cells_come_from_the_memory_cells(tmp_path):
    out = str(tmp_path)
    path = os.path.join(out, "cells.jsonl")
    for b in (2, 4):  # synthetic memory cells: 1 MiB fixed + 2 MiB per sample
        record(path, _cell(method="reprop", batch=b, size=16),
                     {"total_bytes": (1 + 2 * b) * report.MiB}, {})
    args = cli.parser().parse_args(["--results", out, "speed", "--methods", "reprop",
                                      "standard", "--size", "16", "--max-batch-gib",
                                      str(21 / 1024)])
    args.results_file = path
    (cell,) = grid.cells(args, "speed")  # standard has no memory cells: no max-batch cell
    assert (cell.method, cell.batch) == ("reprop", 10)


def test_gpu_script_parses_and_documents_smoke():
    script = os.path.join(ROOT, "experiments", "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    with open(script) as f:
        text = f.read()
    assert "--smoke" in text and "status.txt" in text


def test_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["memory", "--methods", "fastest"])
    assert "invalid choice" in capsys.readouterr().err


def test_report_of_an_empty_folder_writes_an_empty_report(tmp_path):
    assert report.main(["--results", str(tmp_path)]) == 0
    with open(tmp_path / "report.md") as f:
        assert f.read().startswith("# Benchmark results (0 cells)")
    assert json.loads(json.dumps(load(str(tmp_path / "cells.jsonl")))) == []


def test_other_experiments_run_as_sub_commands(monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("fake_experiment")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fake_experiment", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("fake_experiment", "a test double"))
    assert cli.main(["fake", "--x", "1"]) == 3
    assert cli.main(["--results", "somewhere", "fake", "--smoke"]) == 3
    assert calls == [["--x", "1"], ["--smoke"]]
    assert set(cli.SUBCOMMANDS) >= {"numerics", "overlap", "gpu-compile", "parity"}


def test_headline_says_where_a_reversible_method_is_not_below_remat():
    mem = []
    for method, per_sample in [("standard", 300.0), ("remat", 40.0), ("reprop", 20.0),
                               ("pareprop", 50.0)]:
        mem.append({"framework": "jax", "backend": "cpu", "model": "vit-b", "method": method,
                    "depth": None, "size": 224, "dtype": "float32", "where": "jax CPU",
                    "MiB/sample": per_sample, "max batch": 10})
    (row,) = report.headline_table(mem, "jax CPU")
    assert row["reprop / remat"] == pytest.approx(0.5)
    assert row["standard / reprop"] == pytest.approx(15.0)
    lines = report.headline_lines([row])
    assert lines == [
        "vit-b (224) reprop: 20 MiB/sample, 0.50x remat, 15x below standard",
        "vit-b (224) pareprop: 50 MiB/sample, 1.25x remat, NOT below remat, 6x below standard"]


def test_demo_is_the_headline_at_real_size():
    """The memory cells compile ViT-B and ViT-L at 224 px in every headline method (no run),
    jax on XLA:CPU, at two batch sizes for the slope; the speed cells are small."""
    memory, speed = demo.DEMO
    cells = grid.cells(grid.grid_args("unused", **memory[0]), "memory")
    assert {(c.framework, c.backend, c.model, c.size) for c in cells} == {
        ("jax", "cpu", "vit-b", 224), ("jax", "cpu", "vit-l", 224)}
    assert {c.method for c in cells} == {"standard", "remat", "reprop", "pareprop"}
    assert len({c.batch for c in cells}) == 2
    assert speed["size"] <= 64 and set(speed["frameworks"]) == {"jax", "torch"}


def test_demo_smoke_writes_the_results_and_prints_the_headline(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["--results", out, "demo", "--smoke"]) == 0
    printed = capsys.readouterr().out
    assert "Training memory per sample" in printed and "x remat" in printed
    assert "vit-test (32) reprop:" in printed and "Throughput" in printed
    files = set(os.listdir(out))
    assert {"cells.jsonl", "report.md", "memory_vs_batch.png",
            "throughput_vs_batch.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    cells = load(os.path.join(out, "cells.jsonl"))
    assert not [r for r in cells if "error" in r]
    assert {(r["kind"], r["framework"]) for r in cells} == {
        ("memory", "jax"), ("memory", "torch"), ("speed", "jax"), ("speed", "torch")}


def test_h200_memory_cells_rerun_where_the_plugin_is_seen(tmp_path, monkeypatch, capsys):
    """The default venv does not see the CUDA plugin (it is installed apart): ``memory
    --backend gpu-compile`` reruns the same command through ``revjax.gpu.rerun_with_plugin``
    and returns its exit code; a CPU grid never does."""
    from revjax import gpu

    calls = []
    monkeypatch.setattr(gpu, "rerun_with_plugin", lambda m, argv: calls.append((m, argv)) or 7)
    argv = ["--results", str(tmp_path), "memory", "--backend", "gpu-compile", "--models",
            "vit-test", "--methods", "reprop"]
    assert cli.main(argv) == 7
    assert calls == [("experiments.bench", argv)]
    assert not os.listdir(tmp_path)  # nothing measured in this process

    def missing(module, argv):
        raise RuntimeError("compiling for a GPU without one needs the CUDA plugin")

    monkeypatch.setattr(gpu, "rerun_with_plugin", missing)
    assert cli.main(argv) == 2
    assert "error: compiling for a GPU without one needs the CUDA plugin" in (
        capsys.readouterr().err)
    cpu = ["--results", str(tmp_path), "report"]
    assert cli.main(cpu) == 0  # not a gpu-compile grid: no rerun (missing would say so)


def test_gpu_compile_probe_reruns_where_the_plugin_is_seen(monkeypatch):
    from revjax import gpu

    from experiments.probes import gpu_compile

    calls = []
    monkeypatch.setattr(gpu, "rerun_with_plugin", lambda m, argv: calls.append((m, argv)) or 5)
    assert cli.main(["gpu-compile", "--models", "rev-vit-test"]) == 5
    assert calls == [("experiments.probes.gpu_compile", ["--models", "rev-vit-test"])]
    assert gpu_compile.TEST_OVERRIDES and callable(gpu_compile.compile_step)
