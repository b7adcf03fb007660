"""The training CLI (python -m experiments.train): resume bit for bit, the data loaders on
files in their formats, and bad input (a clear error, nothing half-written). Tiny configs:
Rev-ViT-test at 8 px."""

import json
import os
import pickle
import sys

import jax
import numpy as np
import pytest

from experiments.train import cli, jax_cli
from experiments.train import data as data_lib

TINY = ["--model", "rev-vit-test", "--img-size", "8", "--patch-size", "4", "--batch-size",
        "16", "--no-progress"]


def _files(root):
    """Every file under ``root`` with its size and mtime (to prove nothing changed)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) > 0 and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x),
                                                                      np.asarray(y))
        for x, y in zip(la, lb))


def test_a_stopped_run_resumes_to_the_unbroken_runs_parameters_bit_for_bit(tmp_path):
    args = TINY + ["--data", "digits", "--mode", "pareprop", "--steps", "6", "--eval-every",
                   "3", "--ckpt-every", "2"]
    whole = cli.train(args + ["--out", str(tmp_path / "whole")])
    stopped = cli.train(args + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    assert stopped["status"] == "stopped" and stopped["step"] == 3
    assert not (tmp_path / "split" / "summary.json").exists()
    resumed = cli.train(args + ["--out", str(tmp_path / "split"), "--resume"])
    assert resumed["resumed_from"] == 3 and whole["resumed_from"] is None
    assert _leaves_equal(jax_cli.final_params(str(tmp_path / "whole")),
                         jax_cli.final_params(str(tmp_path / "split")))
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("whole", "split")]
    assert metrics[0] == metrics[1] and len(metrics[0].splitlines()) == 6
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]
    env = whole["environment"]
    for key in ("jax", "flax", "optax", "orbax_checkpoint", "numpy", "python", "cpu_count",
                "platform"):
        assert env[key]
    assert whole["config"]["model"] == "rev-vit-test"
    # a second --resume of a finished run only re-evaluates; parameters stay
    again = cli.train(args + ["--out", str(tmp_path / "split"), "--resume"])
    assert again["eval_accuracy"] == whole["eval_accuracy"]


def _cifar_dir(root, n_train=40, n_test=16):
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n).tolist())}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f)
    return root


def _npz(path, n=48, size=8, channels=3, test=True, nan_at=None):
    rng = np.random.default_rng(1)
    shape = (n, size, size) + ((channels,) if channels else ())
    arrays = {"images": rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32) / 255,
              "labels": rng.integers(0, 4, n)}
    if nan_at is not None:
        arrays["images"][nan_at] = np.nan
    if test:
        arrays["test_images"] = arrays["images"][:8].copy()
        arrays["test_labels"] = arrays["labels"][:8]
        arrays["test_images"][np.isnan(arrays["test_images"])] = 0
    np.savez(path, **arrays)
    return str(path)


def test_cifar10_pickle_and_npz_files_load_and_train(tmp_path):
    root = _cifar_dir(str(tmp_path / "cifar"))
    ds = data_lib.load("cifar10", path=root)
    assert ds.train.x.shape == (40, 32, 32, 3) and ds.test.x.shape == (16, 32, 32, 3)
    assert ds.train.x.dtype == np.float32 and abs(float(ds.train.x.mean())) < 1e-4
    with open(os.path.join(root, "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    first = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0).astype(np.float32)
    # NHWC, channel planes in CIFAR's R, G, B order: standardisation is per channel affine
    corr = np.corrcoef(first[..., 1].ravel(), ds.train.x[0, ..., 1].ravel())[0, 1]
    assert corr > 0.999
    out = cli.train(["--model", "rev-vit-test", "--data", "cifar10", "--data-path", root,
                     "--steps", "2", "--batch-size", "8", "--no-progress",
                     "--out", str(tmp_path / "run_cifar")])
    assert out["status"] == "done" and out["test_examples"] == 16

    held = data_lib.load("npz", path=_npz(tmp_path / "d.npz", n=50, test=False))
    assert len(held.train.x) + len(held.test.x) == 50 and len(held.test.x) == 10
    gray = data_lib.load("npz", path=_npz(tmp_path / "g.npz", channels=0))
    assert gray.image_shape == (8, 8, 1)
    out = cli.train(TINY + ["--data", "npz", "--data-path", str(tmp_path / "d.npz"),
                            "--steps", "2", "--out", str(tmp_path / "run_npz")])
    assert out["status"] == "done" and out["train_examples"] == 40


def test_digits_split_is_deterministic_and_stratified():
    a, b = data_lib.load("digits", img_size=16), data_lib.load("digits", img_size=16)
    assert a.train.x.shape[1:] == a.test.x.shape[1:] == (16, 16, 3)
    assert len(a.train.x) + len(a.test.x) == 1797 and 350 <= len(a.test.x) <= 370
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.train.y, b.train.y)
    assert np.array_equal(np.bincount(a.test.y), np.round(np.bincount(
        np.concatenate([a.train.y, a.test.y])) * 0.2).astype(int))
    order = [data_lib.batch_indices(1437, 64, 0, s) for s in (0, 22, 23)]
    assert len(set(order[0]) & set(order[1])) < 64  # a new epoch, a new order
    assert np.array_equal(order[2], data_lib.batch_indices(1437, 64, 0, 23))


def test_stdlib_docstrings_are_byte_rows_split_by_module():
    ds = data_lib.load("stdlib-docstrings", length=32)
    assert ds.train.x.shape[1] == 32 and len(ds.train.x) > 5 * len(ds.test.x) > 0
    assert ds.train.x.max() <= data_lib.PAD_ID and ds.train.x.min() >= 0
    text = bytes(ds.train.x[0][ds.train.x[0] < 256].astype(np.uint8)).decode("utf-8",
                                                                             "replace")
    assert text.strip()


BAD = [
    (["--model", "rev-vit-xl", "--data", "digits"], cli.ConfigError,
     "unknown model 'rev-vit-xl'; known: "),
    (["--model", "rev-vit-test", "--data", "mnist"], data_lib.DataError,
     "unknown dataset 'mnist'; known: digits"),
    (["--model", "rev-vit-test", "--data", "npz"], data_lib.DataError, "needs --data-path"),
    (["--model", "rev-vit-test", "--data", "npz", "--data-path", "{tmp}/nope.npz"],
     data_lib.DataError, "missing file"),
    (["--model", "rev-vit-test", "--data", "npz", "--data-path", "{tmp}/garbage.npz"],
     data_lib.DataError, "not a readable .npz"),
    (["--model", "rev-vit-test", "--data", "npz", "--data-path", "{tmp}/nolabels.npz"],
     data_lib.DataError, "must hold 'images' and 'labels'"),
    (["--model", "rev-vit-test", "--data", "cifar10", "--data-path", "{tmp}/nope"],
     data_lib.DataError, "is not a directory"),
    (["--model", "rev-vit-test", "--data", "cifar10", "--data-path", "{tmp}/badcifar"],
     data_lib.DataError, "lacks 'data' or 'labels'"),
    (TINY + ["--data", "npz", "--data-path", "{tmp}/big.npz"], data_lib.DataError,
     r"npz images are 12x12 with 3 channel\(s\), but model rev-vit-test expects 8x8 with 3"),
    (TINY + ["--data", "npz", "--data-path", "{tmp}/gray.npz"], data_lib.DataError,
     r"8x8 with 1 channel\(s\), but model rev-vit-test expects 8x8 with 3 channel"),
    (["--model", "rev-roberta-test", "--data", "digits"], cli.ConfigError,
     "needs a text dataset"),
    (["--model", "vit-test", "--data", "digits", "--mode", "reprop"], cli.ConfigError,
     "standard .* supports mode='backprop' only"),
    (["--model", "rev-swin-test", "--data", "digits", "--img-size", "12"], cli.ConfigError,
     "cannot be merged 2x2|not divisible"),
]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip file")
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8, 3)))
    os.makedirs(tmp_path / "badcifar")
    with open(tmp_path / "badcifar" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    _npz(tmp_path / "big.npz", size=12)
    _npz(tmp_path / "gray.npz", channels=1)
    return tmp_path


@pytest.mark.parametrize("argv,error,match", BAD, ids=[m[:24] for _, _, m in BAD])
def test_bad_input_is_a_clear_error_and_writes_nothing(bad_files, argv, error, match):
    out = bad_files / "out"
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv]
    with pytest.raises(error, match=match):
        cli.train(argv + ["--out", str(out), "--no-progress"])
    assert not out.exists()
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 2
    assert not out.exists()


def test_resume_refuses_another_config_and_a_fresh_run_refuses_a_used_dir(tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--data", "digits", "--steps", "4", "--ckpt-every", "2"]
    cli.train(args + ["--out", out, "--stop-after", "2"])
    before = _files(out)
    with pytest.raises(cli.ConfigError, match=r"another model or config \(lr: checkpoint "
                                              r"0.002 vs now 0.01\)"):
        cli.train(args + ["--out", out, "--resume", "--lr", "1e-2"])
    with pytest.raises(cli.ConfigError, match="another model or config .*model: checkpoint "
                                              "'rev-vit-test' vs now 'vit-test'"):
        cli.train([a if a != "rev-vit-test" else "vit-test" for a in args]
                  + ["--out", out, "--resume"])
    with pytest.raises(cli.ConfigError, match="already holds a run; pass --resume"):
        cli.train(args + ["--out", out])
    with pytest.raises(cli.ConfigError, match="holds no run"):
        cli.train(args + ["--out", str(tmp_path / "empty"), "--resume"])
    assert _files(out) == before


def test_a_non_finite_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    n, bs, seed = 48, 16, 0
    # one NaN image in the first batch of step 3 that no earlier step used
    seen = set(np.concatenate([data_lib.batch_indices(n, bs, seed, s) for s in (0, 1)]))
    bad = next(i for i in data_lib.batch_indices(n, bs, seed, 2) if i not in seen)
    path = _npz(tmp_path / "nan.npz", n=n, nan_at=bad)
    out = tmp_path / "run"
    with pytest.raises(cli.TrainingError, match=r"non-finite loss nan .* at step 3; stopped, "
                                                r"the last good checkpoint \(step 2\) is kept"):
        cli.train(TINY + ["--data", "npz", "--data-path", path, "--steps", "5",
                          "--ckpt-every", "1", "--out", str(out)])
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
    assert not (out / "summary.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_killed_run_resumes_to_the_unbroken_runs_parameters_bit_for_bit(tmp_path):
    """SIGKILL a CLI process in the middle (checkpoints every step, so the kill may land in
    a write), then --resume in this process: orbax's atomic writes leave only whole
    checkpoints, and the result equals an unbroken run's."""
    import signal
    import subprocess
    import time

    args = TINY + ["--data", "digits", "--mode", "reprop", "--steps", "120"]
    killed = tmp_path / "killed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args, "--ckpt-every",
                             "1", "--out", str(killed)], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    metrics, deadline = killed / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    resumed = cli.train(args + ["--out", str(killed), "--resume"])
    assert 4 <= resumed["resumed_from"] < 120  # the line of step 5 may precede its save
    cli.train(args + ["--out", str(tmp_path / "whole"), "--ckpt-every", "60"])
    assert _leaves_equal(jax_cli.final_params(str(tmp_path / "whole")),
                         jax_cli.final_params(str(killed)))
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "whole" /
                                                      "metrics.jsonl").read_text()
