"""revjax and revtorch agree: forward outputs, and every parameter and input gradient for
each (jax mode, torch mode) pair, on the same weights and images (see
``experiments/probes/parity.py``)."""

import numpy as np
import pytest
from flax import nnx

import revjax
import revtorch

from experiments.probes import parity as common


@pytest.mark.parametrize("case", common.cases(), ids=common.case_id)
def test_forward_and_every_mode_pair_match(case):
    common.check_case(case)


def test_every_parameter_and_the_input_are_compared():
    """A parameter missing from the comparison would pass silently: count them."""
    name, dtype, depth = common.MODELS[0], "float32", 2
    jmodel, tmodel = common.models(name, dtype, depth)
    grads = common.torch_grads(name, dtype, depth, "backprop")
    n_jax = sum(int(np.prod(g.shape)) for g in grads["params"].values())
    assert n_jax == sum(p.numel() for p in tmodel.parameters())
    assert len(grads["params"]) == len(nnx.to_flat_state(nnx.state(jmodel, nnx.Param)))
    x, _ = common.inputs(name, dtype, depth)
    assert grads["input"].shape == x.shape and np.abs(grads["input"]).max() > 0


@pytest.mark.parametrize("mode", ["reprop", "pareprop"])
def test_standard_twins_refuse_reversible_modes_alike(mode):
    jmodel, tmodel = common.models("vit-test", "float32", 1)
    x, _ = common.inputs("vit-test", "float32", 1)
    with pytest.raises(ValueError, match="backprop"):
        jmodel(x, mode=mode)
    with pytest.raises(ValueError, match="backprop"):
        tmodel(common.to_nchw(x), mode=mode)
    assert revjax.MODES == revtorch.MODES
