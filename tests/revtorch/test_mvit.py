"""Rev-MViT and MViTv2 in revtorch: gradients per mode and fusion, dropout replay, memory over
stage depth, parameter counts, the relative position index, pooling attention and the stage
transition against direct references, stages, errors."""

from fractions import Fraction

import numpy as np
import pytest
import torch

import revtorch
from revtorch import models, stages
from revtorch.models import mvit
from revtorch.train import cross_entropy_loss

from .common import max_grad_err, model_grads as grads, rel_err, saved_bytes

REV_MODES = ("reprop", "pareprop")


def build(name="rev-mvit-test", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build(name, param_dtype=dtype, **overrides)


def batch(dtype=torch.float64, n=2, img=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, img, img, generator=g, dtype=dtype)
    return images, torch.randint(0, 10, (n,), generator=g)


def is_zero_in_exact_arithmetic(name: str) -> bool:
    """The LayerNorm bias after K pooling: adding a constant to every key shifts each softmax
    row by a constant, so its gradient is exactly zero and what is computed is roundoff."""
    return name.endswith("norm_k.bias")


def param_scale(g: dict) -> float:
    """The largest gradient entry over all parameters."""
    return max(v.abs().max().item() for k, v in g.items() if k != "images")


def grad_err(got: dict, want: dict) -> float:
    """``max_grad_err`` (relative, per tensor), except for the ``norm_k.bias`` gradients
    (zero up to roundoff): those absolutely, against the largest parameter gradient."""
    assert got.keys() == want.keys()
    rel = [k for k in want if not is_zero_in_exact_arithmetic(k)]
    err = max_grad_err({k: got[k] for k in rel}, {k: want[k] for k in rel})
    scale = param_scale(want)
    absolute = [(got[k] - want[k]).abs().max().item() / scale
                for k in want if is_zero_in_exact_arithmetic(k)]
    return max([err, *absolute])


def norm_k_bias_is_roundoff(g: dict, tol: float = 1e-12) -> bool:
    scale = param_scale(g)
    zero = [v.abs().max().item() for k, v in g.items() if is_zero_in_exact_arithmetic(k)]
    return bool(zero) and max(zero) <= tol * scale


# --- gradients ------------------------------------------------------------------------------

# Reversible stack depths 1, 2, 3 (2-stage overrides: depths[1] - 1 after the transition), every
# fusion, and the 3-stage test variant with dropout + linear drop-path replayed by the backward.
GRAD_CASES = [
    dict(depths=(1, 2), fusion="avg"),
    dict(depths=(2, 3), fusion="add"),
    dict(depths=(3, 4), fusion="concat_mlp"),
    dict(fusion="concat", drop_rate=0.1, drop_path_rate=0.3),
]


@pytest.mark.parametrize("mode", REV_MODES)
@pytest.mark.parametrize("case", GRAD_CASES,
                         ids=lambda c: f"{c.get('depths', 'test')}-{c['fusion']}")
def test_gradients_match_backprop_float64(case, mode):
    model = build(**case).train()
    images, labels = batch()
    loss_b, want = grads(model, images, labels, "backprop")
    loss, got = grads(model, images, labels, mode)
    assert rel_err(loss, loss_b) <= 1e-12
    assert grad_err(got, want) <= 1e-9
    assert norm_k_bias_is_roundoff(want) and norm_k_bias_is_roundoff(got)
    if not case.get("drop_rate"):  # (drop-path may drop a whole branch for the batch)
        assert all(g.abs().max() > 0 for k, g in want.items() if not is_zero_in_exact_arithmetic(k))
    else:  # the masks are really drawn: eval mode gives another loss
        per_layer, transition = model.stage_inputs(1, train=True)
        rates = np.split(np.linspace(0, 0.3, 7), [2, 5])[1]  # 7 blocks, stage 2 has 3
        assert per_layer["key"].shape == (2,) and transition["key"].shape == ()
        assert torch.allclose(per_layer["drop_path"], torch.tensor(rates[1:], dtype=torch.float32))
        assert abs(float(transition["drop_path"]) - rates[0]) < 1e-7
        assert model.stage_inputs(1, train=False) == (None, {})
        model.eval()
        assert grads(model, images, labels, mode)[0] != loss


@pytest.mark.parametrize("mode", REV_MODES)
def test_gradients_match_backprop_float32(mode):
    model = build(dtype=torch.float32)
    images, labels = batch(torch.float32)
    _, want = grads(model, images, labels, "backprop")
    _, got = grads(model, images, labels, mode)
    assert grad_err(got, want) <= 1e-4


def test_bfloat16_compute_under_autocast():
    torch.manual_seed(0)
    model = models.build("rev-mvit-test", dtype=torch.bfloat16)
    images, labels = batch(torch.float32)
    logits = model(images)
    assert logits.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    reference = models.build("rev-mvit-test")
    reference.load_state_dict(model.state_dict())
    assert rel_err(logits, reference(images)) <= 0.05
    out = {mode: grads(model, images, labels, mode) for mode in revtorch.MODES}
    loss_b, want = out["backprop"]
    table = want["stages.0.blocks.f.0.attn.rel_pos_h"]
    assert table.dtype == torch.float32 and table.abs().max() > 0
    for mode in revtorch.MODES:
        loss, got = out[mode]
        assert torch.isfinite(loss) and rel_err(loss, loss_b) <= 1e-6
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got.values())
        assert grad_err(got, want) <= 0.1, mode


# --- memory ---------------------------------------------------------------------------------


def _saved_bytes(mode, depths):
    """Bytes of the tensors saved for backward by forward + loss, leaving out the model's
    buffers (the constant relative position indices)."""
    model = build(dtype=torch.float32, depths=depths)
    images, labels = batch(torch.float32, n=2)
    return saved_bytes(lambda: cross_entropy_loss(model(images, mode=mode), labels),
                       model.buffers())


@pytest.mark.parametrize("mode", revtorch.MODES)
def test_saved_activation_bytes_over_stage_depth(mode):
    """Only the reversible stacks get deeper, 2 -> 8 blocks in each stage (the transition and
    fusion stay as they are)."""
    small, large = _saved_bytes(mode, (2, 3)), _saved_bytes(mode, (8, 9))
    if mode == "backprop":
        assert large > 2 * small
    else:
        assert large <= 1.1 * small


# --- parameter counts -----------------------------------------------------------------------

# timm's mvitv2_tiny / small / base (Li et al., 2022 round them to 24M, 35M, 52M).
TIMM = {"t": 24_173_320, "s": 34_870_216, "b": 51_472_744}
PAPER = {"t": 24, "s": 35, "b": 52}


def reversible_extra(c: mvit.MViTConfig) -> int:
    """Parameters Rev-MViT has beyond its standard twin, from the architecture: per fusion at
    each transition (width C_in -> C_out = 2 C_in), and a head on both streams (2 C_last)."""
    n, widths = 0, [c.dim * 2**i for i in range(len(c.depths))]
    for c_in, c_out in zip(widths, widths[1:]):
        if c.fusion == "concat_mlp":  # fc1: 2C -> 2C, fc2: 2C -> C
            n += (2 * c_in * 2 * c_in + 2 * c_in) + (2 * c_in * c_in + c_in)
        if c.fusion == "concat":  # norm1, qkv and shortcut_proj take 2 C_in instead of C_in
            n += 2 * c_in + c_in * 3 * c_out + c_in * c_out
    last = widths[-1]
    return n + 2 * last + last * c.num_classes  # head LayerNorm and classifier on 2 C_last


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(TIMM))
def test_parameter_counts(variant):
    with torch.device("meta"):  # no allocation
        twin, rev = models.build(f"mvit-{variant}"), models.build(f"rev-mvit-{variant}")
    assert n_params(twin) == TIMM[variant]
    assert abs(TIMM[variant] / 1e6 - PAPER[variant]) < 0.55
    assert n_params(rev) == n_params(twin) + reversible_extra(rev.config)


@pytest.mark.parametrize("fusion", stages.FUSIONS)
def test_parameter_counts_per_fusion(fusion):
    with torch.device("meta"):
        twin = models.build("mvit-test")
        rev = models.build("rev-mvit-test", fusion=fusion)
    assert n_params(rev) == n_params(twin) + reversible_extra(rev.config)


# --- the relative position index ------------------------------------------------------------


def brute_index(y: int, u: int, q: int, k: int) -> int:
    """MViTv2's ``y * max(k/q, 1) - u * max(q/k, 1) + (k - 1) * max(q/k, 1)``, exactly."""
    q_ratio, k_ratio = max(Fraction(k, q), 1), max(Fraction(q, k), 1)
    value = y * q_ratio - u * k_ratio + (k - 1) * k_ratio
    assert value >= 0 and value.denominator == 1
    return int(value)


@pytest.mark.parametrize("q, k", [(8, 8), (4, 4), (8, 2), (4, 1), (2, 8)])
def test_rel_pos_index_formula(q, k):
    index = mvit.rel_pos_index(q, k)
    want = [[brute_index(y, u, q, k) for u in range(k)] for y in range(q)]
    assert index.shape == (q, k) and np.issubdtype(index.dtype, np.integer)
    assert (index == np.array(want)).all()
    assert not index.flags.writeable  # cached: must not be modified in place
    rows = 2 * max(q, k) - 1
    assert index.min() >= 0 and index.max() < rows
    if q == k:  # every offset -(k-1) .. k-1 once per diagonal, shifted to 0 .. 2k-2
        assert set(index.ravel().tolist()) == set(range(rows))
        assert (np.diff(index, axis=0) == 1).all() and (np.diff(index, axis=1) == -1).all()
    if k * 4 == q:  # offsets measured on the finer (query) grid: keys 4 query cells apart
        assert (np.diff(index, axis=1) == -4).all() and (np.diff(index, axis=0) == 1).all()


def test_rel_pos_index_is_a_non_persistent_buffer():
    model = build()
    attns = {n: m for n, m in model.named_modules() if isinstance(m, mvit.PoolingAttention)}
    assert len(attns) == 2 + (1 + 2) + (1 + 1)  # each stage's transition and stack F's
    keys, buffers = set(model.state_dict()), dict(model.named_buffers())
    for name, attn in attns.items():
        q, k = attn.size // attn.q_stride, attn.size // attn.kv_stride
        index = attn.rel_pos_index
        assert f"{name}.rel_pos_index" in buffers and f"{name}.rel_pos_index" not in keys
        assert index.dtype == torch.int64 and index.shape == (q, k)
        assert (index == torch.from_numpy(np.array(mvit.rel_pos_index(q, k)))).all()
        head_dim = attn.qkv.out_features // 3 // attn.heads
        assert attn.rel_pos_h.shape == attn.rel_pos_w.shape == (2 * max(q, k) - 1, head_dim)
    sides = {(a.size // a.q_stride, a.size // a.kv_stride) for a in attns.values()}
    # stacks: k = q/4, q/2, q; transitions: q = k (stride 2 both), k = 2q (K/V unpooled)
    assert sides == {(8, 2), (4, 2), (2, 2), (4, 4), (2, 4)}
    assert not any("rel_pos_index" in k for k in keys)


# --- pooling attention and the transition against direct references -------------------------


def randomise(module, seed=0):
    """Every parameter random (LayerNorm scales around 1), so that each one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return module


def depthwise_pool(t, weight, stride):
    """(b, H, W, d) -> depthwise ``weight`` (d, 1, k, k) convolution, zero padding k // 2."""
    if weight is None:
        return t
    b, h, w, d = t.shape
    k = weight.shape[-1]
    p = k // 2
    padded = torch.zeros(b, h + 2 * p, w + 2 * p, d, dtype=t.dtype)
    padded[:, p:p + h, p:p + w] = t
    oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    out = torch.zeros(b, oh, ow, d, dtype=t.dtype)
    for a in range(k):
        for c in range(k):
            rows = slice(a, a + stride * (oh - 1) + 1, stride)
            cols = slice(c, c + stride * (ow - 1) + 1, stride)
            out += padded[:, rows, cols] * weight[:, 0, a, c]
    return out


def layer_norm(t, norm):
    if norm is None:
        return t
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_pooling_attention(x, attn: mvit.PoolingAttention, q_stride, kv_stride):
    """MViTv2's pooling attention written out: per head, pool + normalise Q, K, V; logits
    q.k / sqrt(d) + q.R_h[idx(y, u)] + q.R_w[idx(x, v)] for each query (y, x) and key (u, v),
    idx from ``brute_index``; softmax; + pooled Q; heads side by side; proj."""
    b, n = x.shape[0], attn.heads
    qkv = attn.qkv(x)
    c = qkv.shape[-1] // 3
    d = c // n
    outs = []
    for head in range(n):
        part = [qkv[..., j * c + head * d: j * c + (head + 1) * d] for j in range(3)]
        q = layer_norm(depthwise_pool(part[0], getattr(attn.pool_q, "weight", None), q_stride),
                       attn.norm_q)
        k = layer_norm(depthwise_pool(part[1], getattr(attn.pool_k, "weight", None), kv_stride),
                       attn.norm_k)
        v = layer_norm(depthwise_pool(part[2], getattr(attn.pool_v, "weight", None), kv_stride),
                       attn.norm_v)
        (qh, qw), (kh, kw) = q.shape[1:3], k.shape[1:3]
        logits = torch.zeros(b, qh * qw, kh * kw, dtype=x.dtype)
        for i in range(qh * qw):
            y, xq = divmod(i, qw)
            qi = q[:, y, xq]
            for j in range(kh * kw):
                u, vk = divmod(j, kw)
                logits[:, i, j] = ((qi * k[:, u, vk]).sum(-1) / d**0.5
                                   + (qi * attn.rel_pos_h[brute_index(y, u, qh, kh)]).sum(-1)
                                   + (qi * attn.rel_pos_w[brute_index(xq, vk, qw, kw)]).sum(-1))
        out = torch.softmax(logits, -1) @ v.reshape(b, kh * kw, d) + q.reshape(b, qh * qw, d)
        outs.append(out.reshape(b, qh, qw, d))
    return attn.proj(torch.cat(outs, -1))


@torch.no_grad()
@pytest.mark.parametrize(
    "dim_in, dim_out, size, q_stride, kv_stride, kernel",
    [(6, 8, 8, 2, 2, 3),  # a transition's: Q and K/V pooled by 2, the width changes
     (8, 8, 4, 1, 1, 3),  # stride 1: pooled by a 3x3 convolution all the same
     (8, 8, 8, 1, 4, 3),  # a stage-1 block's: K/V side a quarter of Q's
     (8, 8, 4, 1, 1, 1)],  # kernel and stride 1: no pooling at all
)
def test_pooling_attention_matches_reference(dim_in, dim_out, size, q_stride, kv_stride, kernel):
    torch.manual_seed(0)
    attn = mvit.PoolingAttention(dim_in, dim_out, 2, size, q_stride=q_stride,
                                 kv_stride=kv_stride, kernel=kernel).double()
    randomise(attn)
    assert (attn.pool_q is None) == (attn.norm_q is None) == (kernel == 1 and q_stride == 1)
    x = torch.randn(2, size, size, dim_in, dtype=torch.float64)
    out = attn(x)
    assert out.shape == (2, size // q_stride, size // q_stride, dim_out)
    assert rel_err(out, reference_pooling_attention(x, attn, q_stride, kv_stride)) <= 1e-12
    with pytest.raises(ValueError, match=f"built for a {size}x{size} map"):
        attn(torch.randn(2, 2 * size, 2 * size, dim_in, dtype=torch.float64))


def max_pool_reference(t):
    """3x3 max-pool, stride 2, padding 1 (padding never wins), by explicit windows."""
    b, h, w, c = t.shape
    out = torch.empty(b, (h + 1) // 2, (w + 1) // 2, c, dtype=t.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            window = t[:, max(2 * i - 1, 0):2 * i + 2, max(2 * j - 1, 0):2 * j + 2]
            out[:, i, j] = window.amax(dim=(1, 2))
    return out


@torch.no_grad()
@pytest.mark.parametrize("dim_in, dim_out", [(6, 8), (8, 8)])
def test_transition_block(dim_in, dim_out):
    """Halves the map, changes the width; shortcut: max-pooled shortcut_proj(norm1(x)), also
    when the widths agree (Rev-MViT's concat fusion: 2 C_in = C_out); then the MLP with its
    own residual."""
    torch.manual_seed(0)
    block = mvit.TransitionBlock(dim_in, dim_out, 2, 8, kv_stride=2, mlp_ratio=2.0).double()
    randomise(block)
    x = torch.randn(2, 8, 8, dim_in, dtype=torch.float64)
    out = block(x)
    assert out.shape == (2, 4, 4, dim_out)
    xn = layer_norm(x, block.norm1)
    assert block.shortcut_proj.weight.shape == (dim_out, dim_in)
    skip = max_pool_reference(block.shortcut_proj(xn))
    h = skip + block.attn(xn)
    want = h + block.mlp(layer_norm(h, block.norm2))
    assert rel_err(out, want) <= 1e-13
    assert block.attn.q_stride == 2 and block.attn.kv_stride == 2 and block.attn.size == 8


# --- stages and the public surface ----------------------------------------------------------


def test_stage_structure_and_geometry():
    model = build()
    c = model.config
    assert c.depths == (2, 3, 2) and c.fusion == "concat" and model.mode == "reprop"
    geo = [(g.resolution, g.dim, g.heads, g.kv_stride, g.in_resolution, g.in_dim)
           for g in model.geometry]
    assert geo == [(8, 16, 1, 4, 8, 16), (4, 32, 2, 2, 8, 16), (2, 64, 4, 1, 4, 32)]
    assert model.stages[0].transition is None and model.stages[0].fusion is None
    for i, stage in enumerate(model.stages):
        assert isinstance(stage.blocks, revtorch.RevStack)
        assert stage.blocks.depth == len(stage.blocks.g) == c.depths[i] - (1 if i else 0)
        assert stage.blocks.depth == mvit.stack_depth(c, i)
        if i:
            t, c_in = stage.transition, model.geometry[i].in_dim
            assert isinstance(t, mvit.TransitionBlock)
            assert isinstance(stage.fusion, stages.TwoStreamFusion)
            assert stage.fusion.mode == "concat" and stage.fusion.out_dim == 2 * c_in
            assert t.norm1.normalized_shape == (2 * c_in,)
            assert t.attn.qkv.in_features == t.shortcut_proj.in_features == 2 * c_in
            assert t.shortcut_proj.out_features == model.geometry[i].dim == 2 * c_in
            assert t.attn.qkv.out_features == 3 * model.geometry[i].dim
    assert model.norm.normalized_shape == (128,) and model.head.in_features == 128
    twin = build("mvit-test")
    assert twin.mode == "backprop" and twin.norm.normalized_shape == (64,)
    for i, stage in enumerate(twin.stages):
        assert isinstance(stage.blocks, revtorch.ResidualStack) and stage.fusion is None
        assert stage.blocks.depth == mvit.stack_depth(c, i)
    assert twin.stages[1].transition.norm1.normalized_shape == (16,)
    for fusion in ("avg", "concat_mlp"):
        assert build(fusion=fusion).stages[2].transition.attn.qkv.in_features == 32
    assert build(depths=[1, 2]).config.depths == (1, 2)
    names = models.names()
    assert all(f"{p}mvit-{v}" in names for p in ("rev-", "") for v in mvit.VARIANTS)
    rates = mvit.drop_path_rates(mvit.MViTConfig("x", True, 8, (1, 2, 5, 2), drop_path_rate=0.2))
    np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.2, 10), rtol=1e-6)
    assert [len(r) for r in rates] == [1, 2, 5, 2]


def test_state_dict_has_no_buffers():
    model = build()
    keys = set(model.state_dict())
    assert keys == {n for n, _ in model.named_parameters()}
    assert {"patch_embed.proj.weight", "stages.0.blocks.f.0.attn.rel_pos_h",
            "stages.0.blocks.f.1.attn.pool_k.weight", "stages.1.transition.attn.norm_q.bias",
            "stages.2.transition.mlp.fc2.weight", "stages.2.blocks.g.0.mlp.fc1.weight",
            "norm.weight", "head.weight"} <= keys
    assert len(list(model.buffers())) == 7
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_standard_twin_has_one_stream_and_backprop_only():
    model = build("mvit-test")
    images, labels = batch()
    loss, got = grads(model, images, labels, None)
    assert torch.isfinite(loss)
    assert all(g.abs().max() > 0 for k, g in got.items() if not is_zero_in_exact_arithmetic(k))
    assert norm_k_bias_is_roundoff(got)
    assert rel_err(grads(model, images, labels, "backprop")[0], loss) == 0
    for mode in REV_MODES:
        with pytest.raises(ValueError, match="backprop' only"):
            model(images, mode=mode)
        with pytest.raises(ValueError, match="backprop' only"):
            models.build("mvit-test", mode=mode)


@torch.no_grad()
@pytest.mark.parametrize("name", ["rev-mvit-test", "mvit-test"])
def test_dropout_in_train_mode_only_and_seeded(name):
    model = build(name, drop_rate=0.1, drop_path_rate=0.2).train()
    images, _ = batch()

    def run(seed):
        torch.manual_seed(seed)
        return model(images)

    a = run(3)
    assert torch.equal(a, run(3))  # the same seed, the same masks
    assert not torch.equal(a, run(4))
    model.eval()
    plain = run(3)
    assert torch.equal(plain, run(4)) and not torch.equal(plain, a)


def test_grads_and_hooks_accumulate_once_per_backward():
    model = build(drop_rate=0.1, drop_path_rate=0.2).train()
    images, labels = batch()
    _, want = grads(model, images, labels, "backprop")
    calls = {}
    handles = [p.register_post_accumulate_grad_hook(
        lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, p in model.named_parameters()]
    try:
        for mode in revtorch.MODES:
            calls.clear()
            _, got = grads(model, images, labels, mode)
            assert calls == {n: 1 for n, _ in model.named_parameters()}, mode
            assert grad_err(got, want) <= 1e-9, mode
            # a second backward adds to .grad, once more
            torch.manual_seed(7)
            cross_entropy_loss(model(images, mode=mode), labels).backward()
            doubled = {n: p.grad for n, p in model.named_parameters()}
            assert grad_err(doubled, {n: 2 * want[n] for n in doubled}) <= 1e-9, mode
    finally:
        for h in handles:
            h.remove()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(2, 32, 32, 3), ValueError, r"\(batch, 3, 32, 32\) \(NCHW\)"),  # NHWC
        (torch.randn(2, 3, 64, 64), ValueError, "NCHW"),
        (torch.randn(3, 32, 32), ValueError, "NCHW"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.int64), TypeError, "floating-point"),
    ],
)
def test_image_errors(images, error, match):
    with pytest.raises(error, match=match):
        build()(images)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(depths=(2, 1)), ValueError, "every later stage >= 2"),
        (dict(depths=(0, 2)), ValueError, "stage 1 needs >= 1 block"),
        (dict(depths=()), ValueError, "non-empty tuple of ints"),
        (dict(img_size=30), ValueError, "img_size 30 is not divisible by patch_size 4"),
        (dict(img_size=24), ValueError,
         r"stage 1's 6x6 map is not divisible by its K/V pooling stride 4"),
        (dict(img_size=36, kv_stride=1), ValueError, r"9x9 map cannot be pooled by 2"),
        (dict(heads=3), ValueError, "dim 16 is not divisible by heads 3"),
        (dict(pool_kernel=2), ValueError, "pool_kernel must be a positive odd int"),
        (dict(kv_stride=0), ValueError, "kv_stride must be positive"),
        (dict(drop_rate=1.0), ValueError, r"drop_rate must be in \[0, 1\)"),
        (dict(fusion="max"), ValueError, "fusion must be one of"),
        (dict(depth=3), TypeError, "unknown override"),
    ],
)
def test_build_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        build(**overrides)


def test_mode_and_dtype_errors():
    with pytest.raises(TypeError, match="param_dtype must be a floating dtype"):
        models.build("rev-mvit-test", param_dtype=torch.int32)
    with pytest.raises(ValueError, match="mvit-test is a standard .* mode='backprop' only"):
        models.build("mvit-test", mode="pareprop")
    with pytest.raises(ValueError, match="mode must be one of"):
        build()(batch()[0], mode="fast")
    with pytest.raises(ValueError, match=r"dtype \(compute\) must be None"):
        models.build("rev-mvit-test", dtype=torch.float64)  # float32 parameters
    with pytest.raises(KeyError, match="unknown model"):
        models.build("rev-mvit-xl")
