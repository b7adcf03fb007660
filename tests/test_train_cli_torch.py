"""The training CLI with --framework torch: a stopped run resumes to the unbroken run's
state_dict bit for bit; a checkpoint of another model is refused clearly. Tiny configs:
Rev-ViT-test at 8 px on digits, RoBERTa-test on the stdlib docstrings."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from experiments.train import cli, torch_cli
from experiments.train import data as data_lib

TINY = ["--framework", "torch", "--model", "rev-vit-test", "--img-size", "8",
        "--patch-size", "4", "--batch-size", "16", "--no-progress", "--data", "digits"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and len(a) > 0 and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [
    ["--mode", "pareprop", "--drop-rate", "0.1"],
    ["--model", "rev-roberta-test", "--data", "stdlib-docstrings", "--seq-len", "16",
     "--mode", "reprop"],
])
def test_a_stopped_run_resumes_to_the_unbroken_runs_state_dict_bit_for_bit(
        tmp_path, monkeypatch, extra):
    # a few docstrings instead of parsing the whole standard library (speed)
    docs = {f"mod{i}.py": (json.__doc__ + cli.__doc__).encode() for i in range(12)}
    monkeypatch.setattr(data_lib, "stdlib_docstrings", lambda: docs)
    args = TINY + ["--steps", "5", "--eval-every", "3", "--ckpt-every", "2"] + extra
    whole = cli.train(args + ["--out", str(tmp_path / "whole")])
    stopped = cli.train(args + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    assert stopped == {"status": "stopped", "step": 3, "out": str(tmp_path / "split")}
    assert not (tmp_path / "split" / "summary.json").exists()
    # checkpoints of steps 2 and 3, written atomically (no temporary file left)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == [
        "step_00000002.pt", "step_00000003.pt"]
    resumed = cli.train(args + ["--out", str(tmp_path / "split"), "--resume"])
    assert resumed["resumed_from"] == 3 and whole["resumed_from"] is None
    a = torch_cli.final_state_dict(str(tmp_path / "whole"))
    b = torch_cli.final_state_dict(str(tmp_path / "split"))
    assert _equal(a, b)
    before = torch.load(torch_cli.checkpoints(str(tmp_path / "whole"))[0][1],
                        weights_only=True)["model"]
    assert not _equal(a, before)  # step 4 -> 5 moved the weights
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("whole", "split")]
    assert metrics[0] == metrics[1] and len(metrics[0].splitlines()) == 5
    recs = [json.loads(line) for line in metrics[0].splitlines()]
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] > 0 and "eval_loss" in recs[2]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in recs)
    assert resumed["eval_loss"] == whole["eval_loss"]
    assert whole["framework"] == "torch" and whole["environment"]["torch"]
    assert whole["config"]["framework"] == "torch"
    ck = torch.load(torch_cli.checkpoints(str(tmp_path / "whole"))[-1][1],
                    weights_only=True)
    assert ck["step"] == 5 and set(ck) >= {"model", "optimizer", "scheduler", "rng",
                                            "data_position"}
    assert ck["scheduler"]["last_epoch"] == 5


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    base = ["--steps", "4", "--ckpt-every", "2", "--eval-every", "100"]
    cli.train(TINY + base + ["--out", str(tmp_path / "vit"), "--stop-after", "2"])
    # the run directory's config names another model
    with pytest.raises(cli.ConfigError, match="another model or config .*model: checkpoint "
                       "'rev-vit-test' vs now 'vit-test'"):
        cli.train(TINY + base + ["--out", str(tmp_path / "vit"), "--resume",
                                 "--model", "vit-test", "--mode", "backprop"])
    # a checkpoint file of another model dropped into a run of this one
    std = TINY + base + ["--model", "vit-test", "--mode", "backprop"]
    cli.train(std + ["--out", str(tmp_path / "std"), "--stop-after", "2"])
    ckpts = tmp_path / "std" / "checkpoints"
    shutil.copy(tmp_path / "vit" / "checkpoints" / "step_00000002.pt",
                ckpts / "step_00000003.pt")
    with pytest.raises(cli.ConfigError, match="step_00000003.pt is of model 'rev-vit-test', "
                       "not 'vit-test'"):
        cli.train(std + ["--out", str(tmp_path / "std"), "--resume"])
    assert cli.main(std + ["--out", str(tmp_path / "std"), "--resume"]) == 2
    # the jax path refuses to resume a torch run
    with pytest.raises(cli.ConfigError, match="framework: checkpoint 'torch' vs now 'jax'"):
        cli.train([a for a in std if a not in ("--framework", "torch")]
                  + ["--out", str(tmp_path / "std"), "--resume"])


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    n, bs, seed = 48, 16, 0
    # one NaN image in the batch of step 3 that no earlier step used
    seen = set(np.concatenate([data_lib.batch_indices(n, bs, seed, s) for s in (0, 1)]))
    bad = next(i for i in data_lib.batch_indices(n, bs, seed, 2) if i not in seen)
    rng = np.random.default_rng(1)
    images = rng.random((n, 8, 8, 3), dtype=np.float32)
    images[bad] = np.nan
    labels = rng.integers(0, 4, n)
    path = str(tmp_path / "nan.npz")
    np.savez(path, images=images, labels=labels, test_images=np.nan_to_num(images[:8]),
             test_labels=labels[:8])
    out = tmp_path / "run"
    argv = [a if a != "digits" else "npz" for a in TINY] + ["--data-path", path]
    with pytest.raises(cli.TrainingError, match=r"non-finite loss nan .* at step 3; stopped, "
                                                r"the last good checkpoint \(step 2\) is kept"):
        cli.train(argv + ["--steps", "5", "--ckpt-every", "1", "--out", str(out)])
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000001.pt", "step_00000002.pt"]
    assert not (out / "summary.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_float16_trains_with_a_grad_scaler_and_is_torch_only(tmp_path):
    args = TINY + ["--steps", "3", "--dtype", "float16", "--mode", "reprop"]
    summary = cli.train(args + ["--out", str(tmp_path / "fp16")])
    assert summary["status"] == "done" and np.isfinite(summary["final_train_loss"])
    ck = torch.load(torch_cli.checkpoints(str(tmp_path / "fp16"))[-1][1], weights_only=True)
    assert ck["scaler"]["scale"] > 0
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
    jax_args = [a for a in args if a not in ("--framework", "torch")]
    with pytest.raises(cli.ConfigError, match="float16 is for --framework torch"):
        cli.train(jax_args + ["--out", str(tmp_path / "jax")])
    assert not (tmp_path / "jax").exists()
