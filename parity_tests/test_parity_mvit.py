"""Rev-MViT and MViTv2: revjax and revtorch agree on the same weights and images: the forward
logits, and every parameter gradient (pooling convolutions and their norms, both relative
position tables, the transitions' shortcut projections, the head) and the input gradient for
each (jax mode, torch mode) pair, at the default test config (three stages, depths (2, 3, 2):
reversible stacks of depth 2, 2 and 1 and two pooling transitions; see ``common``)."""

import numpy as np
import pytest
from flax import nnx

from experiments.probes import parity as common

MODELS, DEPTHS = common.MVIT_MODELS, common.MVIT_DEPTHS


@pytest.mark.parametrize("case", common.cases(MODELS, DEPTHS), ids=common.case_id)
def test_forward_and_every_mode_pair_match(case):
    common.check_case(case)


def test_the_case_has_pooling_transitions_and_odd_and_even_stacks():
    """The comparison covers what makes MViT MViT: Q-pooling transitions between stages
    (reversible: after a stream fusion), K/V pooling with strides 4, 2 and 1, and reversible
    stacks of odd and even depth."""
    for name in MODELS:
        jmodel, _ = common.models(name, "float32", DEPTHS[0])
        assert [g.kv_stride for g in jmodel.geometry] == [4, 2, 1]
        assert all(s.transition is not None for s in jmodel.stages[1:])
        assert all((s.fusion is not None) == jmodel.config.reversible for s in jmodel.stages[1:])
        if jmodel.config.reversible:
            assert {s.blocks.depth % 2 for s in jmodel.stages} == {0, 1}


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_compared(name):
    """A parameter missing from the comparison would pass silently: count them; each must
    have a nonzero gradient but those that are zero in exact arithmetic (K-pooling norm
    biases), which must be roundoff-small."""
    dtype, depth = "float64", DEPTHS[0]
    jmodel, tmodel = common.models(name, dtype, depth)
    grads = common.torch_grads(name, dtype, depth, "backprop")["params"]
    assert sum(int(np.prod(g.shape)) for g in grads.values()) == sum(
        p.numel() for p in tmodel.parameters())
    assert len(grads) == len(nnx.to_flat_state(nnx.state(jmodel, nnx.Param)))
    scale = max(np.abs(g).max() for g in grads.values())
    zero = [k for k in grads if common.ZERO_GRADIENT.search(k)]
    assert sum(grads[k].size for k in zero) == sum(
        p.numel() for k, p in tmodel.named_parameters() if k.endswith("norm_k.bias")) > 0
    for k, g in grads.items():
        if k in zero:
            assert np.abs(g).max() <= 1e-12 * scale, k
        else:
            assert np.abs(g).max() > 1e-9 * scale, k
