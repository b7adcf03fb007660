"""Rev-RoBERTa and RoBERTa: revjax and revtorch agree on the same weights and token ids with
a padding mask (some positions padded): the forward logits, and every parameter gradient
(the tied token embedding included: it gets the lookup's and the decoder's gradients) for
each (jax mode, torch mode) pair, at depth 2 (see ``experiments/probes/parity.py``)."""

import numpy as np
import pytest
from flax import nnx

from experiments.probes import parity as common

MODELS, DEPTHS = common.ROBERTA_MODELS, common.ROBERTA_DEPTHS


@pytest.mark.parametrize("case", common.cases(MODELS, DEPTHS), ids=common.case_id)
def test_forward_and_every_mode_pair_match(case):
    common.check_case(case)


def test_the_inputs_are_padded():
    (ids, mask), w = common.model_inputs(MODELS[0], "float32", DEPTHS[0])
    config = common.models(MODELS[0], "float32", DEPTHS[0])[0].config
    assert mask.all(axis=1).any() and not mask.all()  # a full row and a padded one
    assert (ids[~mask] == config.pad_id).all() and (ids[mask] != config.pad_id).all()
    assert w.shape == (*ids.shape, config.vocab_size)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_is_compared(name):
    """A parameter missing from the comparison would pass silently: count them; the tied
    embedding is one parameter on each side, with a gradient from both of its uses."""
    dtype, depth = "float32", DEPTHS[0]
    jmodel, tmodel = common.models(name, dtype, depth)
    grads = common.torch_grads(name, dtype, depth, "backprop")
    n_jax = sum(int(np.prod(g.shape)) for g in grads["params"].values())
    assert n_jax == sum(p.numel() for p in tmodel.parameters())
    assert len(grads["params"]) == len(nnx.to_flat_state(nnx.state(jmodel, nnx.Param)))
    assert all(np.abs(g).max() > 0 for g in grads["params"].values())
