"""Data for the training CLI: image sets (NHWC float32, labels int32) and byte-level text,
each with a deterministic train/test split, and the batch order as a pure function of
(seed, step), so that a resumed run sees the batches an unbroken run would.

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package),
  resized bilinearly to the model's size and replicated to 3 channels; 20% test, split per
  class by a fixed permutation.
- ``cifar10``: a directory in CIFAR-10's python-pickle format (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``; dicts with ``b"data"`` (N, 3072) uint8, ``b"labels"``).
- ``npz``: a file with ``images`` (N, H, W, C) or (N, H, W) and integer ``labels`` (N,),
  optionally ``test_images`` / ``test_labels`` (else 20% is held out).
- ``stdlib-docstrings``: the docstrings of Python's standard library (parsed with ``ast``
  from the installed sources), as bytes; modules are split 90/10 by a hash of their name.

Images are scaled to [0, 1] (uint8 / 255, digits / 16) and standardised with the training
set's per-channel mean and std. Every problem raises ``DataError`` with what was expected.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
import sysconfig
from dataclasses import dataclass

import numpy as np

IMAGE_DATASETS = ("digits", "cifar10", "npz")
TEXT_DATASETS = ("stdlib-docstrings",)
DATASETS = IMAGE_DATASETS + TEXT_DATASETS

# byte-level tokens: 0..255 are bytes, then the special tokens
PAD_ID, MASK_ID = 256, 257
TEXT_VOCAB = 258


class DataError(ValueError):
    """Missing, malformed or unfitting data."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # images (N, H, W, C) float32, or token ids (N, L) int32
    y: np.ndarray | None  # labels (N,) int32 (images); None for text


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


# -------------------------------------------------------------------------- images


def _held_out(labels: np.ndarray, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """A boolean test mask: ``fraction`` of each class, chosen by a fixed permutation."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test[idx[:int(round(fraction * len(idx)))]] = True
    return test


def _standardise(train: np.ndarray, test: np.ndarray):
    """Per-channel standardisation with the training set's statistics (over its finite
    pixels: a non-finite pixel stays non-finite and stops training with a clear error)."""
    finite = np.where(np.isfinite(train), train, np.nan)
    mean = np.nanmean(finite, axis=(0, 1, 2), keepdims=True)
    std = np.nanstd(finite, axis=(0, 1, 2), keepdims=True) + 1e-6
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, h, w, C) to (N, size, size, C) (jax.image, antialiased)."""
    import jax

    if images.shape[1:3] == (size, size):
        return images
    out = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")
    return np.asarray(out, np.float32)


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"{where}: labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    if n and labels.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, got {labels.min()}")
    return labels.astype(np.int32)


def _as_images(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{where}: images must have shape (N, H, W, C) or (N, H, W) with "
                        f"N > 0, got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise DataError(f"{where}: images must be uint8 or float, got {images.dtype}")
    return images.astype(np.float32)


def load_digits(img_size: int, channels: int = 3) -> Dataset:
    """scikit-learn's digits, resized to ``img_size`` and replicated to ``channels``."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # pragma: no cover (the dev/train extras install it)
        raise DataError("the digits data set needs scikit-learn: pip install "
                        "'revjax[train]'") from e
    d = sk_digits()
    images = (d.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    images = np.repeat(_resize(images, img_size), channels, axis=-1)
    labels = d.target.astype(np.int32)
    test = _held_out(labels)
    xtr, xte = _standardise(images[~test], images[test])
    return Dataset("digits", Split(xtr, labels[~test]), Split(xte, labels[test]), 10)


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"CIFAR-10: missing file {path}") from None
    except Exception as e:  # noqa: BLE001 (any unpickling failure is a malformed file)
        raise DataError(f"CIFAR-10: {path} is not a python-pickle batch ({e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10: {path} holds a {type(batch).__name__}, not a dict")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise DataError(f"CIFAR-10: {path} lacks 'data' or 'labels' (has {sorted(keys)})")
    data = np.asarray(keys["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"CIFAR-10: {path}: data must be (N, 3072) uint8, got {data.shape} "
                        f"{data.dtype}")
    labels = _check_labels(np.asarray(keys["labels"]), len(data), path)
    return {"x": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "y": labels}


def load_cifar10(path: str) -> Dataset:
    """CIFAR-10 in its python-pickle format from a directory (``cifar-10-batches-py``)."""
    if not os.path.isdir(path):
        raise DataError(f"CIFAR-10: {path!r} is not a directory (expected the unpacked "
                        "cifar-10-batches-py with data_batch_1..5 and test_batch)")
    names = sorted(n for n in os.listdir(path) if n.startswith("data_batch_"))
    if not names:
        raise DataError(f"CIFAR-10: no data_batch_* files in {path}")
    train = [_unpickle(os.path.join(path, n)) for n in names]
    test = _unpickle(os.path.join(path, "test_batch"))
    xtr = np.concatenate([b["x"] for b in train]).astype(np.float32) / 255.0
    ytr = np.concatenate([b["y"] for b in train])
    xte = test["x"].astype(np.float32) / 255.0
    xtr, xte = _standardise(xtr, xte)
    return Dataset("cifar10", Split(xtr, ytr), Split(xte, test["y"]), 10)


def load_npz(path: str) -> Dataset:
    """``images`` / ``labels`` (and optionally ``test_images`` / ``test_labels``)."""
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"npz: missing file {path}") from None
    except Exception as e:  # noqa: BLE001 (not an npz / corrupt zip)
        raise DataError(f"npz: {path} is not a readable .npz file ({e})") from None
    with f:
        if "images" not in f or "labels" not in f:
            raise DataError(f"npz: {path} must hold 'images' and 'labels', has {sorted(f)}")
        images = _as_images(f["images"], path)
        labels = _check_labels(f["labels"], len(images), path)
        if ("test_images" in f) != ("test_labels" in f):
            raise DataError(f"npz: {path} has only one of 'test_images' and 'test_labels'")
        if "test_images" in f:
            xte = _as_images(f["test_images"], path + " (test_images)")
            yte = _check_labels(f["test_labels"], len(xte), path + " (test_labels)")
            if xte.shape[1:] != images.shape[1:]:
                raise DataError(f"npz: {path}: test_images {xte.shape[1:]} differ from "
                                f"images {images.shape[1:]}")
            xtr, ytr = images, labels
        else:
            test = _held_out(labels)
            xtr, ytr, xte, yte = images[~test], labels[~test], images[test], labels[test]
    xtr, xte = _standardise(xtr, xte)
    num_classes = int(max(ytr.max(), yte.max() if len(yte) else 0)) + 1
    return Dataset("npz", Split(xtr, ytr), Split(xte, yte), num_classes)


# ---------------------------------------------------------------------------- text


def stdlib_docstrings() -> dict[str, bytes]:
    """Every docstring (modules, classes, functions) of the standard library's top-level
    ``.py`` files and packages, per module, as UTF-8 bytes; sorted by module name."""
    root = sysconfig.get_paths()["stdlib"]
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib",
                                                              "site-packages", "__pycache__")
                             and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, ValueError, OSError):
                continue
            docs = [ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef))]
            text = "\n\n".join(d for d in docs if d)
            if text:
                out[os.path.relpath(path, root)] = text.encode("utf-8")
    return dict(sorted(out.items()))


def _to_rows(chunks: list[bytes], length: int) -> np.ndarray:
    """Non-overlapping rows of ``length`` bytes from each chunk (the tail padded)."""
    rows = []
    for b in chunks:
        a = np.frombuffer(b, np.uint8).astype(np.int32)
        for i in range(0, len(a), length):
            row = np.full(length, PAD_ID, np.int32)
            piece = a[i:i + length]
            row[:len(piece)] = piece
            if len(piece) >= length // 4:
                rows.append(row)
    return np.stack(rows)


def load_stdlib_docstrings(length: int) -> Dataset:
    """Byte-level rows of ``length`` tokens; modules whose name hashes to 0 mod 10 are test."""
    docs = stdlib_docstrings()
    if not docs:
        raise DataError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}")
    is_test = lambda name: int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0
    train = _to_rows([b for n, b in docs.items() if not is_test(n)], length)
    test = _to_rows([b for n, b in docs.items() if is_test(n)], length)
    return Dataset("stdlib-docstrings", Split(train, None), Split(test, None))


# --------------------------------------------------------------------------- entry


def load(name: str, *, path: str | None = None, img_size: int | None = None,
         channels: int = 3, length: int | None = None) -> Dataset:
    """Load a data set by name (``DATASETS``); ``path`` for cifar10 / npz; digits are
    resized to ``img_size`` with ``channels`` channels; text rows have ``length`` tokens."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name in ("cifar10", "npz") and not path:
        raise DataError(f"dataset {name!r} needs --data-path")
    if name == "digits":
        return load_digits(img_size or 16, channels)
    if name == "cifar10":
        return load_cifar10(path)
    if name == "npz":
        return load_npz(path)
    return load_stdlib_docstrings(length or 64)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training examples of ``step``: epochs are seeded permutations of ``range(n)``,
    cut into ``n // batch_size`` full batches (the remainder is dropped per epoch)."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise DataError(f"batch size {batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]
