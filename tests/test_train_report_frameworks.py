"""The training sweep with --framework torch names its cells apart and passes the flag; its
report keeps the frameworks' rows apart (a torch table after the jax one, targets per
framework)."""

import json
import os

from experiments.train import report as train_report
from experiments.train import sweep as train_sweep


def test_sweep_cells_per_framework():
    jax_cells = train_sweep.cells([0], ["vit"])
    torch_cells = train_sweep.cells([0], ["vit"], "torch")
    assert [n for n, _ in torch_cells] == [f"torch_{n}" for n, _ in jax_cells]
    for (_, a), (_, b) in zip(jax_cells, torch_cells):
        assert "--framework" not in a and b == ["--framework", "torch", *a]


def _run(runs, framework, model, mode, dtype, seed, acc):
    d = runs / f"{framework}_{model}_{mode}_{dtype}_s{seed}"
    d.mkdir()
    cfg = {"model": model, "dtype": dtype, "seed": seed, "framework": framework}
    if framework == "jax":
        del cfg["framework"]  # runs from before --framework existed count as jax
    (d / "summary.json").write_text(json.dumps(
        {"status": "done", "config": cfg, "mode": mode, "eval_accuracy": acc}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"loss": 1.0 / (s + 1)}) + "\n"
                                             for s in range(12)))


def test_report_keeps_frameworks_apart(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for fw, acc in (("jax", 0.9), ("torch", 0.5)):
        for seed in (0, 1):
            _run(runs, fw, "rev-vit-test", "pareprop", "float32", seed, acc + 0.01 * seed)
            _run(runs, fw, "vit-test", "backprop", "float32", seed, acc)
    rows = train_report.aggregate(train_report.load(str(runs)))["rows"]
    by = {(r["framework"], r["model"]): r for r in rows}
    assert len(rows) == 4 and by[("torch", "rev-vit-test")]["mean"] == 0.505
    assert by[("jax", "rev-vit-test")]["values"] == [0.9, 0.91]
    train_report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "table.md").read_text()
    jax_part, torch_part = md.split("torch (revtorch")
    assert "90.5 ± 0.7" in jax_part and "50.5" not in jax_part
    assert "50.5 ± 0.7" in torch_part and "90.5" not in torch_part
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {r["framework"] for r in report["rows"]} == {"jax", "torch"}
    assert [t["check"] for t in report["torch_targets"]] == [
        "rev-vit-test pareprop vs vit-test (float32)"]
