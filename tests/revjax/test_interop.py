"""revjax.interop.torch: exact round trips, layouts, dtypes, error listing, lazy torch import,
a table for a hierarchical model (several stages, each its own depth, transitions), and the
RoBERTa (tied decoder) and Swin tables."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import revjax
from revjax import layers
from revjax.interop import torch as interop
from revjax.interop.torch import Row, WeightMismatchError, from_torch, to_torch

torch = pytest.importorskip("torch")
import revtorch  # noqa: E402

VIT = [n for n in revjax.models.names() if n.startswith(("rev-vit-", "vit-"))]
DTYPES = {"f32": (jnp.float32, torch.float32), "f64": (jnp.float64, torch.float64),
          "bf16": (jnp.bfloat16, torch.bfloat16)}


def params(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=str(k))


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rev-vit-test", "vit-test"])
def test_to_torch_then_from_torch_gives_identical_arrays(name, dtype):
    jdtype, tdtype = DTYPES[dtype]
    with jax.enable_x64(dtype == "f64"):
        a = revjax.models.build(name, rngs=nnx.Rngs(0), depth=3, param_dtype=jdtype)
        b = revjax.models.build(name, rngs=nnx.Rngs(1), depth=3, param_dtype=jdtype)
        sd = to_torch(a)
        assert all(t.dtype == tdtype for t in sd.values())
        assert from_torch(b, sd) is b
        assert_same_params(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rev-vit-test", "vit-test"])
def test_from_torch_then_to_torch_gives_identical_tensors(name, dtype):
    jdtype, tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    tmodel = revtorch.models.build(name, depth=3, param_dtype=tdtype)
    with jax.enable_x64(dtype == "f64"):
        jmodel = revjax.models.build(name, rngs=nnx.Rngs(0), depth=3, param_dtype=jdtype)
        sd = to_torch(from_torch(jmodel, tmodel.state_dict()))
    assert_same_tensors(sd, tmodel.state_dict())
    assert list(sd) == list(tmodel.state_dict())  # even the order
    tmodel.load_state_dict(sd, strict=True)


def test_layouts_transpose_stack_and_permute():
    torch.manual_seed(0)
    tmodel = revtorch.models.build("rev-vit-test", depth=2)
    sd = tmodel.state_dict()
    m = from_torch(revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), depth=2), sd)
    kernel = np.asarray(m.blocks.f.attn.qkv.kernel.get_value())
    assert kernel.shape == (2, 32, 96)
    for i in range(2):
        np.testing.assert_array_equal(kernel[i], sd[f"blocks.f.{i}.attn.qkv.weight"].numpy().T)
        np.testing.assert_array_equal(np.asarray(m.blocks.g.norm.scale.get_value())[i],
                                      sd[f"blocks.g.{i}.norm.weight"].numpy())
    conv = np.asarray(m.patch_embed.proj.kernel.get_value())  # (kh, kw, in, out)
    np.testing.assert_array_equal(conv, sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(m.head.kernel.get_value()),
                                  sd["head.weight"].numpy().T)


@pytest.mark.parametrize("name", VIT)
def test_the_vit_table_fits_every_variant(name):
    """Keys and shapes agree for every registered ViT, without allocating (abstract jax
    model, torch on the meta device)."""
    jmodel = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        sd = revtorch.models.build(name).state_dict()
    entries, _ = interop._plan(jmodel)
    got = {k: e.torch_shape() for e in entries for k in e.keys()}
    assert got == {k: tuple(v.shape) for k, v in sd.items()}


def test_an_abstract_model_can_be_filled():
    torch.manual_seed(0)
    tmodel = revtorch.models.build("rev-vit-test")
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    with jax.default_device(jax.devices("cpu")[0]):  # as torch here (no GPU TF32 matmuls)
        jmodel = nnx.eval_shape(lambda: revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0)))
        from_torch(jmodel, tmodel.state_dict())
        got = np.asarray(jmodel(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_one_error_lists_all_missing_unexpected_and_mis_shaped_keys():
    jmodel = revjax.models.build("rev-vit-test", rngs=nnx.Rngs(0), depth=2)
    before = params(jmodel)
    sd = revtorch.models.build("rev-vit-test", depth=3).state_dict()  # one layer too many
    del sd["head.bias"], sd["blocks.f.1.attn.qkv.weight"]
    sd["extra.weight"] = torch.zeros(3)
    sd["norm.weight"] = torch.zeros(5)
    sd["blocks.g.0.mlp.fc1.weight"] = torch.zeros(128, 31)
    with pytest.raises(WeightMismatchError) as err:
        from_torch(jmodel, sd)
    e = err.value
    assert e.missing == ["blocks.f.1.attn.qkv.weight", "head.bias"]
    assert sorted(e.unexpected) == sorted(
        [k for k in sd if k.startswith(("blocks.f.2.", "blocks.g.2."))] + ["extra.weight"])
    assert e.mis_shaped == [("blocks.g.0.mlp.fc1.weight", (128, 32), (128, 31)),
                            ("norm.weight", (64,), (5,))]
    for key in ("head.bias", "extra.weight", "blocks.g.2.norm.bias", "norm.weight",
                "expected [64], got [5]"):
        assert key in str(e)
    after = params(jmodel)
    assert all(after[k] is before[k] for k in before), "a failed load must change nothing"


def test_a_model_without_a_table_is_refused():
    class Plain(nnx.Module):
        def __init__(self):
            self.lin = layers.dense(2, 2, nnx.Rngs(0))

    with pytest.raises(TypeError, match="no conversion table"):
        to_torch(Plain())


def test_rows_are_checked():
    with pytest.raises(ValueError, match="unknown kind"):
        Row("a", "a", "dense")
    with pytest.raises(ValueError, match="not in the jax pattern"):
        Row("a.b", "a.{s}.b", "linear")
    with pytest.raises(ValueError, match="torch pattern"):
        Row("a.{i}", "a.{i}", "linear")


def test_torch_is_imported_lazily():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import revjax.interop.torch as t\n"
            "assert callable(t.from_torch) and callable(t.to_torch)\n"
            "import revjax, flax.nnx as nnx\n"
            "m = revjax.models.build('vit-test', rngs=nnx.Rngs(0), depth=1)\n"
            "try:\n    t.to_torch(m)\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# A hierarchical model: two reversible stages of different widths and depths with a
# non-reversible transition between them; the table is all it takes.


@dataclasses.dataclass(frozen=True)
class HierConfig:
    name: str = "toy-hier"


class Hier(nnx.Module):
    def __init__(self, rngs):
        self.config = HierConfig()
        self.stages = nnx.List([
            revjax.RevStack(lambda r, d=d: layers.MlpHalf(d, 2 * d, rngs=r),
                            lambda r, d=d: layers.MlpHalf(d, 2 * d, rngs=r), depth=k, rngs=rngs)
            for d, k in ((4, 1), (8, 3))])
        self.transitions = nnx.List([layers.dense(4, 8, rngs)])
        self.norm = layers.layer_norm(8, rngs)


HIER_TABLE = (
    Row("stages.{s}.{half}.norm", "stages.{s}.{half}.{i}.norm", "norm"),
    Row("stages.{s}.{half}.mlp.{fc}", "stages.{s}.{half}.{i}.mlp.{fc}", "linear"),
    Row("transitions.{t}", "downsample.{t}", "linear"),
    Row("norm", "norm", "norm"),
)


@pytest.fixture
def hier_table():
    interop.register_table(HierConfig, HIER_TABLE)
    yield
    del interop.TABLES[HierConfig]


def test_a_hierarchical_model_needs_only_a_table(hier_table):
    a, b = Hier(nnx.Rngs(0)), Hier(nnx.Rngs(1))
    sd = to_torch(a)
    layer_keys = [k for k in sd if k.startswith("stages.1.f.") and k.endswith("fc1.weight")]
    assert layer_keys == [f"stages.1.f.{i}.mlp.fc1.weight" for i in range(3)]
    assert tuple(sd["stages.0.g.0.mlp.fc2.weight"].shape) == (4, 8)
    assert tuple(sd["downsample.0.weight"].shape) == (8, 4)
    assert len(sd) == 6 * 2 * (1 + 3) + 2 + 2  # 6 leaves per F or G, 4 layers; transition, norm
    from_torch(b, sd)
    assert_same_params(a, b)
    sd.pop("stages.1.g.2.norm.bias")
    with pytest.raises(WeightMismatchError, match=r"stages\.1\.g\.2\.norm\.bias"):
        from_torch(b, sd)


# RoBERTa: the MLM decoder is tied to the token embedding, one parameter on each side, so
# one key (torch's state_dict has no decoder entry either).


@pytest.mark.parametrize("dtype", ["f32", "f64"], ids=str)
@pytest.mark.parametrize("name", ["rev-roberta-test", "roberta-test"])
def test_roberta_round_trips_exactly(name, dtype):
    jdtype, tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    tmodel = revtorch.models.build(name, param_dtype=tdtype)
    with jax.enable_x64(dtype == "f64"):
        jmodel = revjax.models.build(name, rngs=nnx.Rngs(0), param_dtype=jdtype)
        sd = to_torch(from_torch(jmodel, tmodel.state_dict()))
        other = revjax.models.build(name, rngs=nnx.Rngs(1), param_dtype=jdtype)
        assert_same_params(from_torch(other, sd), jmodel)
    assert_same_tensors(sd, tmodel.state_dict())
    assert list(sd) == list(tmodel.state_dict())
    assert not any("decoder" in k for k in sd)
    tmodel.load_state_dict(sd, strict=True)
    np.testing.assert_array_equal(np.asarray(jmodel.tok_embed.embedding.get_value()),
                                  tmodel.tok_embed.weight.detach().numpy())


# Swin: hierarchical (per-stage rows and depths), a two-stream fusion before each patch
# merging (reversible), a bias-free reduction, and one relative position bias table per layer.

SWIN = [n for n in revjax.models.names() if n.startswith(("rev-swin-", "swin-"))]


@pytest.mark.parametrize("dtype", ["f32", "f64"], ids=str)
@pytest.mark.parametrize("name", ["rev-swin-test", "swin-test"])
def test_swin_round_trips_exactly(name, dtype):
    jdtype, tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    tmodel = revtorch.models.build(name, param_dtype=tdtype)
    with jax.enable_x64(dtype == "f64"):
        # abstract models (no initialisation, which is slow eagerly): filled from torch
        build = lambda: revjax.models.build(name, rngs=nnx.Rngs(0), param_dtype=jdtype)  # noqa
        jmodel = from_torch(nnx.eval_shape(build), tmodel.state_dict())
        sd = to_torch(jmodel)
        assert_same_params(from_torch(nnx.eval_shape(build), sd), jmodel)
    assert all(t.dtype == tdtype for t in sd.values())
    assert_same_tensors(sd, tmodel.state_dict())  # every key (order: table, not torch's)
    tmodel.load_state_dict(sd, strict=True)
    table = np.asarray(jmodel.stages[0].blocks.f.attn.relative_position_bias_table.get_value())
    w = 2 * jmodel.config.window_size - 1
    assert table.shape == (jmodel.config.depths[0], w * w, jmodel.config.heads[0])
    for i in range(table.shape[0]):
        np.testing.assert_array_equal(table[i], sd[
            f"stages.0.blocks.f.{i}.attn.relative_position_bias_table"].numpy())
    np.testing.assert_array_equal(
        np.asarray(jmodel.stages[1].transition.reduction.kernel.get_value()),
        sd["stages.1.transition.reduction.weight"].numpy().T)
    assert "stages.1.transition.reduction.bias" not in sd
    assert any(k.startswith("stages.1.fusion.") for k in sd) == name.startswith("rev-")


@pytest.mark.parametrize("name", SWIN)
def test_the_swin_table_fits_every_variant(name):
    """Keys and shapes agree for every registered Swin, without allocating (abstract jax
    model, torch on the meta device)."""
    jmodel = nnx.eval_shape(lambda: revjax.models.build(name, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        sd = revtorch.models.build(name).state_dict()
    entries, _ = interop._plan(jmodel)
    got = {k: e.torch_shape() for e in entries for k in e.keys()}
    assert got == {k: tuple(v.shape) for k, v in sd.items()}


# A torch model that registers a tied tensor under two names (state_dict lists both,
# named_parameters one): the alias is declared, written as the same tensor, optional on load.


@dataclasses.dataclass(frozen=True)
class TiedConfig:
    name: str = "toy-tied"


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.config = TiedConfig()
        self.embed = nnx.Embed(5, 3, rngs=rngs)


@pytest.fixture
def tied_table():
    interop.register_table(TiedConfig, [Row("embed", "embed", "embed")],
                           tied={"decoder.weight": "embed.weight"})
    yield
    del interop.TABLES[TiedConfig], interop.TIED[TiedConfig]


def test_a_tied_alias_is_written_shared_and_optional_on_load(tied_table):
    a, b = Tied(nnx.Rngs(0)), Tied(nnx.Rngs(1))
    sd = to_torch(a)
    assert list(sd) == ["embed.weight", "decoder.weight"]
    assert sd["decoder.weight"] is sd["embed.weight"]
    assert_same_params(from_torch(b, sd), a)
    c = Tied(nnx.Rngs(2))
    assert_same_params(from_torch(c, {"embed.weight": sd["embed.weight"]}), a)  # as a grad dict
    with pytest.raises(ValueError, match="tied keys"):
        from_torch(c, {"embed.weight": sd["embed.weight"], "decoder.weight": torch.zeros(5, 3)})
    with pytest.raises(WeightMismatchError, match="decoder.weight"):
        from_torch(c, {"embed.weight": sd["embed.weight"], "decoder.weight": torch.zeros(5, 2)})
