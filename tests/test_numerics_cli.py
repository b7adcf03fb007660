"""The numerics probe (experiments/probes/numerics.py) --smoke: it runs, writes its results
atomically, and what it measures holds together (the float32-stream policy makes the
bfloat16 rebuild exact on this model; float32's drift is at float32 rounding)."""

import json
import os

import pytest

from experiments.probes import numerics


def test_smoke_run(tmp_path, capsys):
    out = tmp_path / "numerics"
    payload = numerics.main(["--smoke", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["numerics.json", "numerics.jsonl", "numerics.png"]
    saved = json.loads((out / "numerics.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert "jax" in saved["environment"]
    lines = (out / "numerics.jsonl").read_text().splitlines()
    assert len(lines) == len(saved["rows"]) > 0
    rows = saved["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert len(r["rebuild"]) == r["depth"] and r["rebuild_max"] == max(r["rebuild"])
        if r["dtype"] == "float32":
            assert r["rebuild_max"] < 1e-5 and r["reprop_vs_backprop"] < 1e-4
        if r["dtype"] == "bfloat16" and r["policy"] == "none" and r["anchor_every"] is None:
            assert r["rebuild_max"] > 1e-4  # all-bfloat16 streams drift
        if r["anchor_every"] is not None:  # anchored layers are exact
            assert all(e == 0 for e in r["rebuild"][::r["anchor_every"]])
    assert saved["targets"] and all("met" in t for t in saved["targets"])
    printed = capsys.readouterr().out
    assert "| model" in printed and "rebuild_max" in printed


def test_bad_arguments():
    with pytest.raises(SystemExit):
        numerics.main(["--dtypes", "float8"])
    with pytest.raises(SystemExit, match="at least 1"):
        numerics.main(["--smoke", "--anchors", "0"])
