"""Rev-RoBERTa and RoBERTa in revjax, and the MLM helpers: gradients per mode with padding,
padding invariance, optimizer steps, memory, parameter counts, masking statistics, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import revjax
from revjax import mlm
from revjax.models import roberta

from ..helpers import rel_err, tree_rel_err

TOL = {jnp.float64: 1e-9, jnp.float32: 1e-4}
MASK_ID = 3  # the test vocabulary's <mask>; 0 <s>, 1 <pad>, 2 </s> as RoBERTa's
LENGTHS = (16, 11, 7, 1)  # real tokens per row; rows are right-padded to 16


def batch(config, lengths=LENGTHS, length=16, seed=0, left_pad_last=True):
    """(ids, labels): rows with ``lengths`` real tokens (<s> ... </s>), padded with pad_id
    (the last row on the left when ``left_pad_last``), masked by ``mlm.mask_tokens``."""
    k_tok, k_mask = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k_tok, (len(lengths), length), 4, config.vocab_size)
    pos = jnp.arange(length)
    rows = []
    for i, n in enumerate(lengths):
        row = jnp.where(pos == 0, 0, jnp.where(pos == n - 1, 2, tokens[i]))
        row = jnp.where(pos < n, row, config.pad_id)
        if left_pad_last and i == len(lengths) - 1:
            row = jnp.roll(row, length - n)
        rows.append(row)
    ids = jnp.stack(rows)
    inputs, labels = mlm.mask_tokens(ids, k_mask, mask_id=MASK_ID, vocab_size=config.vocab_size,
                                     pad_id=config.pad_id, prob=0.3)
    return inputs, labels


@functools.cache
def grad_fn(graphdef):
    """One jitted (loss, logits, grads) per graphdef, shared by the tests."""
    def loss(params, ids, mask, labels, mode, key):
        rngs = None if key is None else nnx.Rngs(dropout=key)
        logits = nnx.merge(graphdef, params)(ids, mask, mode=mode, rngs=rngs)
        return mlm.mlm_loss(logits, labels), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=4)


def run(model, ids, labels, mode, mask=None, key=None):
    """(loss, logits, grads); the padding mask is always passed (derived from pad_id when
    None, as the model does) so that the tests share compiled functions."""
    mask = ids != model.config.pad_id if mask is None else mask
    graphdef, params = nnx.split(model)
    (loss, logits), grads = grad_fn(graphdef)(params, ids, mask, labels, mode, key)
    return loss, logits, grads


# --- gradients and padding -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_rev_roberta_gradients_match_backprop(depth, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(depth), depth=depth,
                                    param_dtype=dtype)
        ids, labels = batch(model.config)
        assert (ids == model.config.pad_id).any()  # a padding mask is present
        loss_b, _, want = run(model, ids, labels, "backprop")
        for mode in ("reprop", "pareprop"):
            loss, _, got = run(model, ids, labels, mode)
            assert rel_err(loss, loss_b) <= TOL[dtype]
            assert tree_rel_err(got, want) <= TOL[dtype], mode
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(want))


@pytest.mark.parametrize("name,mode", [("rev-roberta-test", m) for m in revjax.MODES]
                         + [("roberta-test", "backprop")])
def test_padded_positions_change_nothing(name, mode):
    """Less or more padding, or other tokens at padded positions, leave the logits at real
    positions and every parameter gradient of a loss over real positions unchanged
    (float64)."""
    with jax.enable_x64(True):
        model = revjax.models.build(name, rngs=nnx.Rngs(0), depth=3, param_dtype=jnp.float64)
        c = model.config
        ids, labels = batch(c, lengths=(12, 9, 5, 1), left_pad_last=False)  # 4+ pads per row
        real = ids != c.pad_id
        loss, logits, grads = run(model, ids, labels, mode)
        # 1. four pad tokens fewer per row
        loss2, logits2, grads2 = run(model, ids[:, :12], labels[:, :12], mode)
        # 2. random tokens at the padded positions, the padding given by the mask
        junk = jax.random.randint(jax.random.key(5), ids.shape, 0, c.vocab_size)
        loss3, logits3, grads3 = run(model, jnp.where(real, ids, junk), labels, mode, mask=real)
        for lo, lg, gr, n in ((loss2, logits2, grads2, 12), (loss3, logits3, grads3, 16)):
            keep = real[:, :n, None]
            assert rel_err(lo, loss) <= 1e-12
            assert rel_err(jnp.where(keep, lg, 0), jnp.where(keep, logits[:, :n], 0)) <= 1e-12
            assert tree_rel_err(gr, grads) <= 1e-9
        assert rel_err(logits3, logits) > 1e-3  # the padded positions' own outputs did change


def test_dropout_and_drop_path_are_replayed_exactly():
    with jax.enable_x64(True):
        model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0), depth=3,
                                    param_dtype=jnp.float64, drop_rate=0.2, drop_path_rate=0.3)
        ids, labels = batch(model.config)
        key = jax.random.key(7)
        _, _, want = run(model, ids, labels, "backprop", key=key)
        for mode in ("reprop", "pareprop"):
            assert tree_rel_err(run(model, ids, labels, mode, key=key)[2], want) <= 1e-9
        assert tree_rel_err(run(model, ids, labels, "pareprop")[2], want) > 1e-3


def test_position_ids_and_tied_decoder():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(roberta.position_ids(mask),
                                  [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0))
    assert model.pos_embed.embedding.shape == (16 + 2, 32)
    ids, _ = batch(model.config)
    model.head.bias[...] = jax.random.normal(jax.random.key(1), (100,))
    h = model.features(ids)
    head = model.head
    want = head.norm(jax.nn.gelu(head.dense(h), approximate=False)) \
        @ model.tok_embed.embedding[...].T + head.bias[...]
    assert rel_err(model(ids), want) <= 1e-6
    # no separate decoder weight: the only (vocab, dim) parameter is the token embedding
    shapes = [a.shape for a in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert shapes.count((100, 32)) == 1 and shapes.count((32, 100)) == 0


def test_standard_twin_and_compute_dtype():
    model = revjax.models.build("roberta-test", rngs=nnx.Rngs(0))
    assert model.mode == "backprop" and isinstance(model.blocks, revjax.ResidualStack)
    ids, _ = batch(model.config)
    with pytest.raises(ValueError, match="backprop' only"):
        model(ids, mode="reprop")
    with pytest.raises(ValueError, match="backprop' only"):
        revjax.models.build("roberta-test", rngs=nnx.Rngs(0), mode="pareprop")
    low = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    ref = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0))
    assert low.tok_embed.embedding.dtype == jnp.float32
    logits = low(ids, mode="reprop")
    assert logits.dtype == jnp.bfloat16 and rel_err(logits, ref(ids)) <= 0.05


# --- training ------------------------------------------------------------------------------


def _train(name, mode, tx, steps):
    model = revjax.models.build(name, rngs=nnx.Rngs(0), mode=mode)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids, labels = batch(model.config, seed=1)
    losses = [float(mlm.train_step(model, opt, ids, labels)) for _ in range(steps)]
    return losses, nnx.state(model, nnx.Param)


def test_sgd_steps_give_the_same_parameters_in_every_mode():
    ref_losses, ref = _train("rev-roberta-test", "backprop", optax.sgd(0.5), 3)
    for mode in ("reprop", "pareprop"):
        losses, params = _train("rev-roberta-test", mode, optax.sgd(0.5), 3)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        assert tree_rel_err(params, ref) <= 1e-5
    assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("name,mode", [("rev-roberta-test", m) for m in revjax.MODES]
                         + [("roberta-test", "backprop")])
def test_adamw_lowers_the_mlm_loss(name, mode):
    losses, _ = _train(name, mode, optax.adamw(1e-2), 8)
    assert losses[-1] < 0.7 * losses[0], losses


# --- memory --------------------------------------------------------------------------------


def _temp_bytes(mode, depth):
    model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0), depth=depth, max_len=64)
    graphdef, params = nnx.split(model)
    ids, labels = batch(model.config, lengths=(64, 50, 40, 30, 20, 10, 5, 64), length=64)
    lowered = grad_fn(graphdef).lower(params, ids, ids != 1, labels, mode, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", revjax.MODES)
def test_memory_over_depth(mode):
    one, four = _temp_bytes(mode, 3), _temp_bytes(mode, 12)
    if mode == "backprop":
        assert four > 2 * one, (one, four)
    else:
        assert four <= 1.1 * one, (one, four)


# --- parameter counts ----------------------------------------------------------------------

# Published sizes (fairseq's RoBERTa release, Liu et al., 2019): base 125M, large 355M. The
# published architecture (post-norm, as BERT): embeddings with a one-row token-type table and
# a LayerNorm, post-norm layers, the MLM head (dense, LayerNorm, tied decoder, bias); the
# pooler is not part of the MLM. Ours is pre-norm: the same per-layer parameters (two
# LayerNorms per layer either way), plus the final LayerNorm a pre-norm encoder needs (+2C),
# minus the token-type row (-C): exactly C more than the published layout, +768 (base) and
# +1024 (large), 124.70M and 355.41M, both within 0.5M of the published (rounded) sizes. The
# reversible model has the same count as its twin: F and G are the same modules and the
# streams are averaged (no parameters), so no 2C-wide head as in Rev-ViT.
PUBLISHED = {"base": 125e6, "large": 355e6}
COUNTS = {"base": 124_698_201, "large": 355_413_081, "test": 30_532}  # as revtorch's


def published_layout_count(c) -> int:
    """The published (post-norm) RoBERTa MLM, counted from its description."""
    d, hidden = c.dim, int(c.dim * c.mlp_ratio)
    embed = c.vocab_size * d + (c.max_len + 2) * d + d + 2 * d  # token, position, type, LN
    layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden) \
        + (hidden * d + d) + 2 * d
    head = d * d + d + 2 * d + c.vocab_size  # dense, LayerNorm, decoder bias (tied weight)
    return embed + c.depth * layer + head


def expected_count(c) -> int:
    """Ours: the published layout with a final LayerNorm (2C) and no token-type row (C)."""
    return published_layout_count(c) + 2 * c.dim - c.dim


def param_count(name):
    model = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0)))
    return model.config, sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", list(roberta.VARIANTS))
def test_parameter_counts(variant):
    rev_config, rev = param_count(f"rev-roberta-{variant}")
    std_config, std = param_count(f"roberta-{variant}")
    assert rev == std == expected_count(rev_config) == COUNTS[variant]
    assert rev - published_layout_count(rev_config) == rev_config.dim
    if variant in PUBLISHED:
        assert abs(rev - PUBLISHED[variant]) < 0.5e6, rev
    torch = pytest.importorskip("torch")
    revtorch = pytest.importorskip("revtorch")
    with torch.device("meta"):
        for name in (f"rev-roberta-{variant}", f"roberta-{variant}"):
            assert sum(p.numel() for p in revtorch.models.build(name).parameters()) == rev


# --- masked-LM helpers ---------------------------------------------------------------------


def test_mask_tokens_statistics():
    vocab, pad = 1000, 1
    ids = jax.random.randint(jax.random.key(0), (256, 512), 4, vocab)
    ids = ids.at[:, 400:].set(pad).at[:, 0].set(0)
    special = ids == 0
    inputs, labels = mlm.mask_tokens(ids, jax.random.key(1), mask_id=MASK_ID, vocab_size=vocab,
                                     pad_id=pad, special_mask=special)
    selected = labels != mlm.IGNORE
    eligible = (ids != pad) & ~special
    assert not (selected & ~eligible).any()  # never padding, never a special token
    np.testing.assert_array_equal(jnp.where(selected, labels, ids), ids)
    np.testing.assert_array_equal(jnp.where(selected, ids, inputs), ids)  # others untouched
    n = int(selected.sum())
    assert abs(n / int(eligible.sum()) - 0.15) < 0.005
    to_mask = float((selected & (inputs == MASK_ID)).sum()) / n
    kept = float((selected & (inputs == ids)).sum()) / n
    other = float((selected & (inputs != ids) & (inputs != MASK_ID)).sum()) / n
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / vocab)) < 0.01
    assert abs(other - 0.1) < 0.01
    np.testing.assert_array_equal(inputs == pad, ids == pad)  # no token becomes padding
    random_ids = jnp.where(selected & (inputs != ids) & (inputs != MASK_ID), inputs, -1)
    assert int(random_ids.max()) > 0.9 * vocab  # random tokens span the vocabulary
    again = mlm.mask_tokens(ids, jax.random.key(1), mask_id=MASK_ID, vocab_size=vocab,
                            pad_id=pad, special_mask=special)
    other_key = mlm.mask_tokens(ids, jax.random.key(2), mask_id=MASK_ID, vocab_size=vocab,
                                pad_id=pad, special_mask=special)
    np.testing.assert_array_equal(again[0], inputs)
    np.testing.assert_array_equal(again[1], labels)
    assert (other_key[1] != labels).any()
    assert inputs.dtype == labels.dtype == ids.dtype


def test_random_replacements_never_draw_padding():
    ids = jnp.full((64, 512), 5, jnp.int32)
    inputs, labels = mlm.mask_tokens(ids, jax.random.key(0), mask_id=3, vocab_size=4, pad_id=1,
                                     prob=1.0)
    assert (labels == 5).all() and not (inputs == 1).any()
    assert {0, 2, 3, 5} == set(np.unique(np.asarray(inputs)).tolist())


def test_mlm_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7), jnp.bfloat16)
    labels = jnp.array([[1, mlm.IGNORE, 6], [mlm.IGNORE, mlm.IGNORE, 0]])
    loss = mlm.mlm_loss(logits, labels)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    want = -(lp[0, 0, 1] + lp[0, 2, 6] + lp[1, 2, 0]) / 3
    assert loss.dtype == jnp.float32 and rel_err(loss, want) <= 1e-6
    assert float(mlm.mlm_loss(logits, jnp.full((2, 3), mlm.IGNORE))) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        mlm.mlm_loss(logits, labels[:, :2])


@pytest.mark.parametrize("name", ["rev-roberta-test", "roberta-test"])
def test_loss_without_the_full_logits_equals_the_mlm_loss(name):
    """``model.loss`` (the head on the predicted positions, in chunks, rematerialised) gives
    the loss and every gradient of ``mlm_loss(model(ids), labels)`` in float64, for chunks
    of one position, a few, and more than the sequence; with padding; and 0 (gradients 0)
    when nothing is predicted."""
    with jax.enable_x64(True):
        model = revjax.models.build(name, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        ids, labels = batch(model.config)
        full = nnx.value_and_grad(lambda m: mlm.mlm_loss(m(ids), labels))
        want, want_g = full(model)
        for chunk in (1, 3, 40):
            loss, g = nnx.value_and_grad(lambda m: m.loss(ids, labels, chunk=chunk))(model)
            assert rel_err(loss, want) <= 1e-12 and tree_rel_err(g, want_g) <= 1e-12, chunk
        none = jnp.full_like(labels, mlm.IGNORE)
        loss, g = nnx.value_and_grad(lambda m: m.loss(ids, none))(model)
        assert float(loss) == 0.0 and all(float(jnp.abs(x).max()) == 0.0
                                          for x in jax.tree.leaves(g))
        with pytest.raises(ValueError, match="do not match"):
            model.loss(ids, labels[:, :5])
        with pytest.raises(ValueError, match="chunk"):
            model.loss(ids, labels, chunk=0)


def test_loss_without_the_full_logits_holds_one_chunk():
    """Compiled memory of the gradient step at length 128 with a 4000-token vocabulary: the
    full logits cost the head path (batch, length, vocab); ``model.loss`` holds one chunk's
    (and the per-sample memory drops by more than half of the logits' bytes)."""
    def temp(path, batch_size):
        model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0), vocab_size=4000,
                                    max_len=128)
        graphdef, params = nnx.split(model)
        ids = jnp.full((batch_size, 128), 5, jnp.int32)
        labels = jnp.where(jnp.arange(128) % 7 == 0, ids, mlm.IGNORE)

        def loss(params):
            m = nnx.merge(graphdef, params)
            return m.loss(ids, labels) if path == "chunks" else mlm.mlm_loss(m(ids), labels)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_sample = {p: (temp(p, 4) - temp(p, 2)) / 2 for p in ("full", "chunks")}
    logits_bytes = 128 * 4000 * 4
    assert per_sample["full"] - per_sample["chunks"] >= 0.5 * logits_bytes, per_sample


# --- errors and registry -------------------------------------------------------------------


def test_errors():
    model = revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0))
    ids, _ = batch(model.config)
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="exceeds max_len 16"):
        model(jnp.ones((2, 17), jnp.int32))
    with pytest.raises(ValueError, match="mask must have"):
        model(ids, ids[:, :5] != 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        model(ids, mode="fastest")
    build = functools.partial(revjax.models.build, "rev-roberta-test", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unknown override"):
        build(num_classes=3)
    with pytest.raises(ValueError, match="not divisible"):
        build(heads=3)
    with pytest.raises(ValueError, match="pad_id 100 is outside"):
        build(pad_id=100)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        build(depth=0)
    with pytest.raises(KeyError, match="unknown model"):
        revjax.models.build("rev-roberta-xl", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="integer token ids"):
        mlm.mask_tokens(ids.astype(float), jax.random.key(0), mask_id=3, vocab_size=100,
                        pad_id=1)
    with pytest.raises(ValueError, match="pad_id and/or special_mask"):
        mlm.mask_tokens(ids, jax.random.key(0), mask_id=3, vocab_size=100)
    with pytest.raises(ValueError, match="must differ"):
        mlm.mask_tokens(ids, jax.random.key(0), mask_id=1, vocab_size=100, pad_id=1)


def test_registry_names():
    names = revjax.models.names()
    for v in ("base", "large", "test"):
        assert f"rev-roberta-{v}" in names and f"roberta-{v}" in names
    assert revjax.models.build("rev-roberta-test", rngs=nnx.Rngs(0)).mode == "reprop"
