"""Rev-Swin and Swin: revjax and revtorch agree on the same weights and images: the forward
logits, and every parameter gradient (fusion, patch merging and each layer's relative
position bias table included) and the input gradient for each (jax mode, torch mode) pair,
at the default test config (two stages, depths (2, 1): shifted and unshifted windows, one
patch merging; see ``common``)."""

import numpy as np
import pytest
from flax import nnx

from experiments.probes import parity as common

MODELS, DEPTHS = common.SWIN_MODELS, common.SWIN_DEPTHS


@pytest.mark.parametrize("case", common.cases(MODELS, DEPTHS), ids=common.case_id)
def test_forward_and_every_mode_pair_match(case):
    common.check_case(case)


def test_the_case_has_shifted_windows_and_a_merging():
    """The comparison covers what makes Swin Swin: a shifted layer (masked windows) and a
    patch merging between stages (and, reversible, a stream fusion)."""
    for name in MODELS:
        jmodel, _ = common.models(name, "float32", DEPTHS[0])
        c = jmodel.config
        assert c.depths[0] >= 2 and len(c.depths) >= 2
        assert jmodel.stages[1].transition is not None
        assert (jmodel.stages[1].fusion is not None) == c.reversible


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_compared(name):
    """A parameter missing from the comparison would pass silently: count them, and each
    must have a nonzero gradient."""
    dtype, depth = "float32", DEPTHS[0]
    jmodel, tmodel = common.models(name, dtype, depth)
    grads = common.torch_grads(name, dtype, depth, "backprop")
    n_jax = sum(int(np.prod(g.shape)) for g in grads["params"].values())
    assert n_jax == sum(p.numel() for p in tmodel.parameters())
    assert len(grads["params"]) == len(nnx.to_flat_state(nnx.state(jmodel, nnx.Param)))
    assert all(np.abs(g).max() > 0 for g in grads["params"].values())
