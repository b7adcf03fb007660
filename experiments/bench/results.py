"""The results file: one JSON line per cell (``cells.jsonl``), rewritten whole and atomically
after each cell, each line with its config, versions, device and date."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from experiments.bench.cells import Cell
from experiments.common import environment

RESULTS, DEMO_RESULTS = "results/bench", "results/demo"


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save(path: str, rows: list[dict]) -> None:
    """Rewrite the JSONL through a temporary file and a rename: never half-written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def env_summary() -> dict:
    """The versions and machine recorded with every cell."""
    env = environment()
    return {k: env.get(k) for k in ("python", "jax", "jaxlib", "flax", "torch", "cpus",
                                    "machine", "jax_devices", "XLA_FLAGS")}


def record(path: str, cell: Cell, result: dict, env: dict) -> dict:
    row = {"key": cell.key, **dataclasses.asdict(cell), **result, "env": env,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows = [r for r in load(path) if r["key"] != cell.key] + [row]
    save(path, rows)
    return row
