"""The training CLI with --framework torch under torchrun (2 processes, gloo, CPU): DDP and
FSDP2 runs end with the parameters of a 1-process run of the same global batch in every mode
(float64), a stopped run resumes bit for bit, and bad launches fail clearly before anything
is written. One torchrun launch runs tests/torchrun_train_worker.py (every distributed case);
a second launches the CLI itself (-m experiments.train) with a bad setting."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.train import cli, torch_cli
from experiments.train import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--framework", "torch", "--model", "rev-vit-test", "--img-size", "8",
        "--patch-size", "4", "--depth", "2", "--batch-size", "16", "--dtype", "float64",
        "--data", "digits", "--steps", "4", "--clip", "0.5", "--eval-every", "100",
        "--ckpt-every", "2", "--no-progress"]
MLM = ["--framework", "torch", "--model", "rev-roberta-test", "--data", "stdlib-docstrings",
       "--seq-len", "16", "--depth", "2", "--batch-size", "16", "--dtype", "float64",
       "--steps", "4", "--eval-every", "100", "--ckpt-every", "4", "--mode", "pareprop",
       "--no-progress"]
MODES = ("backprop", "reprop", "pareprop")
# --standalone: a rendezvous on a free local port
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def rel_diff(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|a|."""
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a
               if a[k].is_floating_point())


def _nan_data(path: str) -> None:
    """48 images; one NaN image in rank 1's half of step 3's batch, unused before."""
    n, bs, seed = 48, 16, 0
    seen = set(np.concatenate([data_lib.batch_indices(n, bs, seed, s) for s in (0, 1)]))
    bad = next(i for i in data_lib.batch_indices(n, bs, seed, 2)[bs // 2:] if i not in seen)
    rng = np.random.default_rng(1)
    images = rng.random((n, 8, 8, 3), dtype=np.float32)
    images[bad] = np.nan
    labels = rng.integers(0, 4, n)
    np.savez(path, images=images, labels=labels, test_images=np.nan_to_num(images[:16]),
             test_labels=labels[:16])


def test_ddp_and_fsdp_equal_one_process_in_every_mode(tmp_path, monkeypatch):
    nan_path = str(tmp_path / "nan.npz")
    _nan_data(nan_path)
    root = tmp_path / "dist"
    proc = subprocess.run(
        TORCHRUN + [os.path.join(ROOT, "tests", "torchrun_train_worker.py"), str(root),
                    json.dumps(BASE), nan_path, json.dumps(MLM)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rcs = [json.loads((root / f"rc_{r}.json").read_text()) for r in (0, 1)]
    assert rcs[0] == rcs[1]
    assert all(rcs[0][k] == 0 for k in rcs[0] if k not in ("three", "nan")), rcs[0]
    for mode in MODES:  # the 1-process references, in this process
        one = cli.train(BASE + ["--mode", mode, "--out", str(tmp_path / f"one_{mode}")])
        ref = torch_cli.final_state_dict(str(tmp_path / f"one_{mode}"))
        first = torch.load(torch_cli.checkpoints(str(tmp_path / f"one_{mode}"))[0][1],
                           weights_only=True)["model"]
        assert rel_diff(ref, first) > 1e-3  # steps 3-4 moved the weights
        ref_losses = [json.loads(x)["loss"] for x in
                      (tmp_path / f"one_{mode}" / "metrics.jsonl").read_text().splitlines()]
        for par in ("dp", "fsdp"):
            out = root / f"{par}_{mode}"
            err = rel_diff(ref, torch_cli.final_state_dict(str(out)))
            print(f"{par} {mode}: parameters max rel diff {err:.1e}")
            assert err <= 1e-9, (par, mode, err)
            losses = [json.loads(x)["loss"] for x in
                      (out / "metrics.jsonl").read_text().splitlines()]
            np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
            summary = json.loads((out / "summary.json").read_text())
            assert summary["processes"] == 2 and summary["parallel"] == par
            assert summary["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-12)
            assert summary["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-9)
            # rank 0 alone wrote, atomically: two checkpoints, nothing temporary
            assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002.pt",
                                                               "step_00000004.pt"]
            ck = torch.load(torch_cli.checkpoints(str(out))[-1][1], weights_only=True)
            assert ck["processes"] == 2 and len(ck["rng"]["ranks"]) == 2
    for par in ("dp", "fsdp"):  # stopped at 2, resumed: the unbroken run, bit for bit
        a = torch_cli.final_state_dict(str(root / f"{par}_pareprop"))
        b = torch_cli.final_state_dict(str(root / f"{par}_split"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert ((root / f"{par}_pareprop" / "metrics.jsonl").read_text()
                == (root / f"{par}_split" / "metrics.jsonl").read_text())
    # MLM under DDP: the ranks' losses weighted by their predicted tokens
    from tests.torchrun_train_worker import few_docstrings
    monkeypatch.setattr(data_lib, "stdlib_docstrings", few_docstrings)
    cli.train(MLM + ["--out", str(tmp_path / "one_mlm")])
    err = rel_diff(torch_cli.final_state_dict(str(tmp_path / "one_mlm")),
                   torch_cli.final_state_dict(str(root / "mlm")))
    print(f"dp mlm: parameters max rel diff {err:.1e}")
    assert err <= 1e-9
    # another process count: refused on both ranks, the run left as it was
    assert rcs[0]["three"] == 2
    assert "written by 3 process(es); resume it with as many, not 2" in proc.stderr
    assert not (root / "three" / "summary.json").exists()
    # a NaN in rank 1's shard stops both ranks at step 3, the checkpoint of step 2 kept
    assert rcs[0]["nan"] == 2
    assert "non-finite loss nan" in proc.stderr and "at step 3" in proc.stderr
    assert torch_cli.checkpoints(str(root / "nan"))[-1][0] == 2
    steps = [json.loads(x)["step"] for x in (root / "nan" / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2]


def test_torchrun_of_the_cli_refuses_parallel_none(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(TORCHRUN + ["-m", "experiments.train", *BASE, "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert ("error: torchrun started 2 processes but --parallel is none: pass --parallel dp "
            "(DistributedDataParallel) or --parallel fsdp (FSDP2)") in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("env, extra, message", [
    ({}, ["--parallel", "dp"], "--parallel dp with --framework torch runs one process per "
     "device, started by torchrun: torchrun --nproc_per_node=N -m experiments.train"),
    ({}, ["--parallel", "fsdp"], "--parallel fsdp with --framework torch"),
    ({"WORLD_SIZE": "2"}, ["--parallel", "dp", "--devices", "4"],
     "--devices 4 but torchrun started 2 processes"),
    ({"WORLD_SIZE": "3"}, ["--parallel", "fsdp"],
     "--batch-size 16 \\(the global batch\\) is not divisible by the 3 processes"),
])
def test_bad_launches_fail_before_anything_is_written(tmp_path, monkeypatch, env, extra,
                                                      message):
    if env:
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29999", **env}.items():
            monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    with pytest.raises(cli.ConfigError, match=message):
        cli.train(BASE + extra + ["--out", str(out)])
    assert not out.exists()
    assert not torch.distributed.is_initialized()
