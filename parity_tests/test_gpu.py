"""On a CUDA GPU, PaReprop is faster than Reprop in each framework (median of timed gradient
steps after warm-up, Rev-ViT-L at 224 px, batch 64), with gradients still matching.

The one speed assertion the design asks for (docs/conventions.md); skipped without CUDA.
"""

import pytest
import torch

from experiments.probes import parity as common

pytestmark = pytest.mark.gpu


def _check(result: dict, framework: str) -> None:
    s = result["seconds"]
    summary = (f"{framework} {common.GPU_MODEL} {common.GPU_IMG}px b{common.GPU_BATCH}: "
               f"reprop {1e3 * s['reprop']:.1f} ms, pareprop {1e3 * s['pareprop']:.1f} ms "
               f"({s['reprop'] / s['pareprop']:.3f}x), grad rel diff {result['grad_diff']:.1e}")
    print(summary)
    assert result["grad_diff"] <= common.TOL["float32"]["grad"], summary
    assert s["pareprop"] < s["reprop"], summary


def test_jax_pareprop_is_faster_than_reprop():
    if not common.jax_gpus():
        pytest.skip("no CUDA device visible to jax (jax.devices('gpu') is empty)")
    _check(common.jax_gpu_speed(), "revjax")


def test_torch_pareprop_is_faster_than_reprop():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch (torch.cuda.is_available() is False)")
    _check(common.torch_gpu_speed(), "revtorch")
