"""Rev-RoBERTa and RoBERTa in revtorch, and the MLM helpers: gradients per mode with padding,
padding invariance, dropout replay, optimizer steps, memory, parameter counts, masking
statistics, errors."""

import copy

import pytest
import torch

import revtorch
from revtorch import layers, mlm, models
from revtorch.models import roberta

from .common import rel_err, saved_bytes

REV_MODES = ("reprop", "pareprop")
MASK_ID = 3  # the test vocabulary's <mask>; 0 <s>, 1 <pad>, 2 </s> as RoBERTa's
LENGTHS = (16, 11, 7, 1)  # real tokens per row; rows are right-padded to 16


def build(name="rev-roberta-test", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, param_dtype=dtype, **overrides)


def batch(config, lengths=LENGTHS, length=16, seed=0, left_pad_last=True):
    """(ids, labels): rows with ``lengths`` real tokens (<s> ... </s>), padded with pad_id
    (the last row on the left when ``left_pad_last``), masked by ``mlm.mask_tokens``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (len(lengths), length), generator=g)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1], ids[i, n:] = 0, 2, config.pad_id
        if left_pad_last and i == len(lengths) - 1:
            ids[i] = ids[i].roll(length - n)
    return mlm.mask_tokens(ids, g, mask_id=MASK_ID, vocab_size=config.vocab_size,
                           pad_id=config.pad_id, prob=0.3)


def grads(model, ids, labels, mode, mask=None, seed=7):
    """(loss, logits, gradient of every parameter) in ``mode``; ``seed`` fixes the dropout
    keys the forward draws."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(ids, mask, mode=mode)
    loss = mlm.mlm_loss(logits, labels)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_grad_err(got, want):
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k]) for k in want)


# --- gradients and padding -----------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("mode", REV_MODES)
def test_gradients_match_backprop(mode, depth, dtype, tol):
    model = build(dtype=dtype, depth=depth)
    ids, labels = batch(model.config)
    assert (ids == model.config.pad_id).any()  # a padding mask is present
    loss_b, _, want = grads(model, ids, labels, "backprop")
    loss, _, got = grads(model, ids, labels, mode)
    assert rel_err(loss, loss_b) <= tol and max_grad_err(got, want) <= tol
    assert all(g.abs().max() > 0 for g in want.values())


@pytest.mark.parametrize("name, mode", [("rev-roberta-test", m) for m in revtorch.MODES]
                         + [("roberta-test", "backprop")])
def test_padded_positions_change_nothing(name, mode):
    """Less or more padding, or other tokens at padded positions, leave the logits at real
    positions and every parameter gradient of a loss over real positions unchanged
    (float64)."""
    model = build(name, depth=3)
    c = model.config
    ids, labels = batch(c, lengths=(12, 9, 5, 1), left_pad_last=False)  # 4+ pads per row
    real = ids != c.pad_id
    loss, logits, want = grads(model, ids, labels, mode)
    # 1. four pad tokens fewer per row (mask derived from pad_id)
    loss2, logits2, got2 = grads(model, ids[:, :12], labels[:, :12], mode)
    # 2. random tokens at the padded positions, the padding given by the mask
    junk = torch.randint(0, c.vocab_size, ids.shape, generator=torch.Generator().manual_seed(5))
    loss3, logits3, got3 = grads(model, torch.where(real, ids, junk), labels, mode, mask=real)
    for lo, lg, got, n in ((loss2, logits2, got2, 12), (loss3, logits3, got3, 16)):
        keep = real[:, :n, None]
        assert rel_err(lo, loss) <= 1e-12
        assert rel_err(lg * keep, logits[:, :n] * keep) <= 1e-12
        assert max_grad_err(got, want) <= 1e-9
    assert rel_err(logits3, logits) > 1e-3  # the padded positions' own outputs did change


@pytest.mark.parametrize("mode", REV_MODES)
def test_dropout_and_drop_path_replay_exactly(mode):
    model = build(depth=3, drop_rate=0.2, drop_path_rate=0.3).train()
    ids, labels = batch(model.config)
    loss_b, _, want = grads(model, ids, labels, "backprop", seed=3)
    loss, _, got = grads(model, ids, labels, mode, seed=3)
    assert rel_err(loss, loss_b) <= 1e-12 and max_grad_err(got, want) <= 1e-9
    assert grads(model, ids, labels, mode, seed=4)[0] != loss  # the masks are drawn
    assert grads(model.eval(), ids, labels, mode, seed=3)[0] != loss


# --- the public surface --------------------------------------------------------------------


def test_layout_positions_and_tied_decoder():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert roberta.position_ids(mask).tolist() == [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4],
                                                   [2, 3, 4, 5, 6]]
    rev, std = build(), build("roberta-test")
    assert rev.mode == "reprop" and std.mode == "backprop"
    assert isinstance(rev.blocks, revtorch.RevStack) and isinstance(std.blocks,
                                                                    revtorch.ResidualStack)
    assert isinstance(rev.blocks.f[0], layers.AttentionHalf)
    assert isinstance(rev.blocks.g[1], layers.MlpHalf)
    assert rev.pos_embed.weight.shape == (16 + 2, 32) and rev.tok_embed.weight.shape == (100, 32)
    assert rev.embed_norm.eps == rev.norm.eps == rev.head.norm.eps == 1e-6
    names = {n for n, _ in rev.named_parameters()}
    assert {"tok_embed.weight", "pos_embed.weight", "embed_norm.weight",
            "blocks.f.1.attn.qkv.bias", "blocks.g.0.mlp.fc2.weight", "norm.bias",
            "head.dense.weight", "head.norm.weight", "head.bias"} <= names
    # no separate decoder weight: the only (vocab, dim) parameter is the token embedding
    assert [tuple(p.shape) for p in rev.parameters()].count((100, 32)) == 1
    assert rev.tok_embed.weight.abs().max() <= 0.04 and (rev.head.bias == 0).all()
    ids, _ = batch(rev.config)
    with torch.no_grad():
        rev.head.bias.normal_()
        h = rev.features(ids)
        head = rev.head
        want = head.norm(torch.nn.functional.gelu(head.dense(h))) @ rev.tok_embed.weight.T
        assert rel_err(rev(ids), want + head.bias) <= 1e-12


def test_bfloat16_compute_under_autocast():
    model = build(dtype=torch.float32)
    low = models.build("rev-roberta-test", dtype=torch.bfloat16)
    low.load_state_dict(model.state_dict())
    ids, labels = batch(model.config)
    logits = low(ids, mode="reprop")
    assert logits.dtype == torch.bfloat16 and low.tok_embed.weight.dtype == torch.float32
    mlm.mlm_loss(logits, labels).backward()
    assert low.tok_embed.weight.grad.dtype == torch.float32
    assert rel_err(logits, model(ids)) <= 0.05


# --- training ------------------------------------------------------------------------------


def test_sgd_steps_match_across_modes():
    base = build(depth=3)
    ids, labels = batch(base.config, seed=1)
    trained = {}
    for mode in revtorch.MODES:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = [mlm.train_step(model, opt, ids, labels, mode=mode) for _ in range(3)]
        trained[mode] = (losses, dict(model.named_parameters()))
    want_losses, want = trained["backprop"]
    for mode in REV_MODES:
        losses, got = trained[mode]
        assert max(abs(a - b) for a, b in zip(losses, want_losses)) <= 1e-12
        assert max(rel_err(got[k], want[k]) for k in want) <= 1e-9
    assert want_losses[-1] < want_losses[0]


@pytest.mark.parametrize("name, mode", [("rev-roberta-test", m) for m in revtorch.MODES]
                         + [("roberta-test", "backprop")])
def test_adamw_lowers_the_mlm_loss(name, mode):
    model = build(name, dtype=torch.float32)
    ids, labels = batch(model.config, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [mlm.train_step(model, opt, ids, labels, mode=mode) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


# --- memory --------------------------------------------------------------------------------


def _saved_bytes(mode, depth):
    """Bytes of the tensors saved for backward by forward + loss on a Rev-RoBERTa."""
    model = build(dtype=torch.float32, depth=depth, max_len=64)
    ids, labels = batch(model.config, lengths=(64, 50, 40, 30, 20, 10, 5, 64), length=64)
    return saved_bytes(lambda: mlm.mlm_loss(model(ids, mode=mode), labels))


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_saved_activation_bytes(mode):
    small, large = _saved_bytes(mode, 2), _saved_bytes(mode, 8)
    if mode == "backprop":
        assert large > 2 * small, (small, large)
    else:
        assert large <= 1.1 * small, (small, large)


# --- parameter counts ----------------------------------------------------------------------

# Published sizes (fairseq's RoBERTa release, Liu et al., 2019): base 125M, large 355M. Ours is
# pre-norm: the published (post-norm) layout's parameters, plus a final LayerNorm (+2C), minus
# the one-row token-type table (-C), no pooler (not part of the MLM): exactly C more, within
# 0.5M of the published (rounded) sizes. Reversible and standard twins have equal counts (the
# streams are averaged, no parameters). See tests/revjax/test_roberta.py.
PUBLISHED = {"base": 125e6, "large": 355e6}
COUNTS = {"base": 124_698_201, "large": 355_413_081, "test": 30_532}  # as revjax's


def published_layout_count(c) -> int:
    """The published (post-norm) RoBERTa MLM, counted from its description."""
    d, hidden = c.dim, int(c.dim * c.mlp_ratio)
    embed = c.vocab_size * d + (c.max_len + 2) * d + d + 2 * d  # token, position, type, LN
    layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden) \
        + (hidden * d + d) + 2 * d
    head = d * d + d + 2 * d + c.vocab_size  # dense, LayerNorm, decoder bias (tied weight)
    return embed + c.depth * layer + head


@pytest.mark.parametrize("variant", list(roberta.VARIANTS))
def test_parameter_counts(variant):
    with torch.device("meta"):  # no allocation
        rev = models.build(f"rev-roberta-{variant}")
        std = models.build(f"roberta-{variant}")
    n = sum(p.numel() for p in rev.parameters())
    assert n == sum(p.numel() for p in std.parameters()) == COUNTS[variant]
    assert n - published_layout_count(rev.config) == rev.config.dim
    if variant in PUBLISHED:
        assert abs(n - PUBLISHED[variant]) < 0.5e6


# --- masked-LM helpers ---------------------------------------------------------------------


def test_mask_tokens_statistics():
    vocab, pad = 1000, 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (256, 512), generator=g)
    ids[:, 400:], ids[:, 0] = pad, 0
    special = ids == 0

    def masked(seed):
        return mlm.mask_tokens(ids, torch.Generator().manual_seed(seed), mask_id=MASK_ID,
                               vocab_size=vocab, pad_id=pad, special_mask=special)

    inputs, labels = masked(1)
    selected, eligible = labels != mlm.IGNORE, (ids != pad) & ~special
    assert not (selected & ~eligible).any()  # never padding, never a special token
    assert torch.equal(torch.where(selected, labels, ids), ids)
    assert torch.equal(torch.where(selected, ids, inputs), ids)  # the others untouched
    n = selected.sum().item()
    assert abs(n / eligible.sum().item() - 0.15) < 0.005
    to_mask = (selected & (inputs == MASK_ID)).sum().item() / n
    kept = (selected & (inputs == ids)).sum().item() / n
    other = (selected & (inputs != ids) & (inputs != MASK_ID)).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(other - 0.1) < 0.01
    assert torch.equal(inputs == pad, ids == pad)  # no token becomes padding
    assert torch.where(selected & (inputs != ids) & (inputs != MASK_ID), inputs, -1).max() \
        > 0.9 * vocab  # random tokens span the vocabulary
    again, other_seed = masked(1), masked(2)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(other_seed[1], labels)
    assert inputs.dtype == labels.dtype == ids.dtype


def test_random_replacements_never_draw_padding():
    ids = torch.full((64, 512), 5, dtype=torch.int32)
    inputs, labels = mlm.mask_tokens(ids, torch.Generator().manual_seed(0), mask_id=3,
                                     vocab_size=4, pad_id=1, prob=1.0)
    assert (labels == 5).all() and set(inputs.unique().tolist()) == {0, 2, 3, 5}


@pytest.mark.parametrize("name", ["rev-roberta-test", "roberta-test"])
def test_loss_without_the_full_logits_equals_the_mlm_loss(name):
    """``model.loss`` (the head on the predicted positions, in checkpointed pieces) gives the
    loss and every gradient of ``mlm_loss(model(ids), labels)`` in float64, for pieces of
    one position per row, a few, and more than the sequence; 0 when nothing is predicted."""
    model = build(name)
    ids, labels = batch(model.config)
    want, _, want_g = grads(model, ids, labels, model.mode)
    for chunk in (1, 3, 40):
        model.zero_grad(set_to_none=True)
        loss = model.loss(ids, labels, chunk=chunk)
        loss.backward()
        assert rel_err(loss.detach(), want) <= 1e-12, chunk
        assert max_grad_err({n: p.grad for n, p in model.named_parameters()},
                            want_g) <= 1e-12, chunk
    assert float(model.loss(ids, torch.full_like(labels, mlm.IGNORE))) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        model.loss(ids, labels[:, :5])
    with pytest.raises(ValueError, match="chunk"):
        model.loss(ids, labels, chunk=0)


def test_mlm_loss():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    labels = torch.tensor([[1, mlm.IGNORE, 6], [mlm.IGNORE, mlm.IGNORE, 0]])
    loss = mlm.mlm_loss(logits, labels)
    lp = torch.log_softmax(logits.float(), -1)
    want = -(lp[0, 0, 1] + lp[0, 2, 6] + lp[1, 2, 0]) / 3
    assert loss.dtype == torch.float32 and rel_err(loss, want) <= 1e-6
    assert mlm.mlm_loss(logits, torch.full((2, 3), mlm.IGNORE)).item() == 0.0
    with pytest.raises(ValueError, match="do not match"):
        mlm.mlm_loss(logits, labels[:, :2])


# --- errors and registry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, mask, error, match",
    [
        (torch.ones(2, 8), None, TypeError, "integer token ids"),
        (torch.ones(2, 8, dtype=torch.bool), None, TypeError, "integer token ids"),
        (torch.ones(8, dtype=torch.long), None, ValueError, r"\(batch, length\)"),
        (torch.ones(2, 17, dtype=torch.long), None, ValueError, "exceeds max_len 16"),
        (torch.full((2, 8), 100), None, ValueError, r"must lie in \[0, 100\)"),
        (torch.full((2, 8), -1), None, ValueError, r"must lie in \[0, 100\)"),
        (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 7), ValueError, "mask must be"),
    ],
)
def test_input_errors(ids, mask, error, match):
    with pytest.raises(error, match=match):
        build()(ids, mask)


def test_mode_build_and_mlm_errors():
    ids, _ = batch(build().config)
    with pytest.raises(ValueError, match="backprop' only"):
        build("roberta-test")(ids, mode="reprop")
    with pytest.raises(ValueError, match="backprop' only"):
        models.build("roberta-test", mode="pareprop")
    with pytest.raises(ValueError, match="mode must be one of"):
        build()(ids, mode="fastest")
    with pytest.raises(TypeError, match="unknown override"):
        models.build("rev-roberta-test", num_classes=3)
    with pytest.raises(ValueError, match="not divisible"):
        models.build("rev-roberta-test", heads=3)
    with pytest.raises(ValueError, match="pad_id 100 is outside"):
        models.build("rev-roberta-test", pad_id=100)
    with pytest.raises(ValueError, match="at least 1"):
        models.build("rev-roberta-test", depth=0)
    with pytest.raises(ValueError, match="compute"):
        models.build("rev-roberta-test", dtype=torch.float64)
    with pytest.raises(KeyError, match="unknown model"):
        models.build("rev-roberta-xl")
    with pytest.raises(TypeError, match="integer token ids"):
        mlm.mask_tokens(ids.float(), mask_id=3, vocab_size=100, pad_id=1)
    with pytest.raises(ValueError, match="pad_id and/or special_mask"):
        mlm.mask_tokens(ids, mask_id=3, vocab_size=100)
    with pytest.raises(ValueError, match="must differ"):
        mlm.mask_tokens(ids, mask_id=1, vocab_size=100, pad_id=1)


def test_registry_names():
    names = models.names()
    for v in ("base", "large", "test"):
        assert f"rev-roberta-{v}" in names and f"roberta-{v}" in names
