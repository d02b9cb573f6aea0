"""The adapter sharding rule (jaxlora.sharding) on one process; multi-device runs: test_parallel."""

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.sharding import factor_specs, init_sharded, lora_shardings

MESH_AXES = ("data", "fsdp", "model")


def _target(shape, layout, r=4, leaf="kernel"):
    params = {"m": {leaf: jax.ShapeDtypeStruct(shape, jnp.float32)}}
    layouts = {} if len(shape) == 2 and "s" not in layout else {"m": layout}
    config = jaxlora.LoraConfig(r=r, target_modules=["m"], layouts=layouts)
    [target] = jaxlora.find_targets(params, config)
    return target


@pytest.mark.parametrize(
    "shape, layout, spec, want_a, want_b",
    [
        ((8, 16), "io", P("fsdp", "model"), P("fsdp", None), P(None, "model")),
        ((8, 16), "io", P(None, "model"), P(None, None), P(None, "model")),  # column parallel
        ((8, 16), "io", P("model", None), P("model", None), P(None, None)),  # row parallel
        ((8, 16), "io", P(("data", "fsdp")), P(("data", "fsdp"), None), P(None, None)),
        # Every axis of a multi-axis DenseGeneral kernel, not only the first.
        ((8, 4, 2), "ioo", P("fsdp", "model", "data"), P("fsdp", None), P(None, "model", "data")),
        ((4, 2, 8), "iio", P("model", "data", "fsdp"), P("model", "data", None), P(None, "fsdp")),
        # A 4-D stacked spec meeting 3-D factors; stacked axes go to both.
        ((3, 8, 4, 2), "sioo", P("data", "fsdp", "model"), P("data", "fsdp", None),
         P("data", None, "model", None)),
        ((3, 4, 2, 8), "siio", P(None, "model", None, "fsdp"), P(None, "model", None, None),
         P(None, None, "fsdp")),
        ((3, 3, 8, 16), "wwio", P(None, None, "fsdp", "model"), P(None, None, "fsdp", None),
         P(None, "model")),
    ],
)  # fmt: skip
def test_factor_specs(shape, layout, spec, want_a, want_b):
    assert factor_specs(_target(shape, layout), spec) == (want_a, want_b)


def test_factor_specs_short_spec_means_replicated_trailing_axes():
    target = _target((3, 8, 4, 2), "sioo")
    assert factor_specs(target, P("data")) == (P("data", None, None), P("data", None, None, None))
    assert factor_specs(target, P()) == (P(None, None, None), P(None, None, None, None))


def test_factor_specs_embedding_rows_go_to_a():
    target = _target((64, 16), "io", leaf="embedding")
    assert factor_specs(target, P("model", "fsdp")) == (P("model", None), P(None, "fsdp"))


def test_factor_specs_rank_axis():
    target = _target((3, 8, 16), "sio")
    got = factor_specs(target, P(None, "fsdp", "model"), rank_axis="data")
    assert got == (P(None, "fsdp", "data"), P(None, "data", "model"))
    got = factor_specs(target, P(None, "fsdp"), rank_axis=("data", "model"))
    assert got == (P(None, "fsdp", ("data", "model")), P(None, ("data", "model"), None))


def test_factor_specs_spec_too_long():
    with pytest.raises(ValueError, match=r"kernel at `m` has 3 entries .* expected at most 2"):
        factor_specs(_target((8, 16), "io"), P("a", "b", "c"))


@pytest.mark.parametrize(
    "spec, factor", [(P("model", None), "lora_a"), (P(None, "model"), "lora_b")]
)
def test_factor_specs_rank_axis_clash(spec, factor):
    with pytest.raises(ValueError, match=rf"reuses mesh axes \['model'\] that `m/{factor}`"):
        factor_specs(_target((8, 16), "io"), spec, rank_axis="model")


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(["io", "ioo", "iio", "sio", "sioo", "ssiio", "wio", "wwio"]),
    data=st.data(),
)
def test_factors_reassemble_the_base_spec(layout, data):
    """Law: a's non-rank entries then b's output entries are exactly the (padded) base spec."""
    shape = tuple(2 + i for i in range(len(layout)))
    entries = data.draw(
        st.lists(st.sampled_from((None,) + MESH_AXES), max_size=len(layout), unique=True)
    )
    spec = P(*entries)
    target = _target(shape, layout)
    a, b = factor_specs(target, spec)
    padded = tuple(entries) + (None,) * (len(layout) - len(entries))
    n_stack = target.n_stack
    assert len(a) == len(target.a_shape) and len(b) == len(target.b_shape)
    assert tuple(a)[:-1] + tuple(b)[n_stack + 1 :] == padded
    assert tuple(b)[:n_stack] == padded[:n_stack]
    assert a[-1] is None and b[n_stack] is None


# ---- whole trees ----------------------------------------------------------------------------


class Block(nn.Module):
    """Logically partitioned attention projections and MLP, as a user's sharded model has them."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()

        def dense(features, names, axis=-1, name=None):
            return nn.DenseGeneral(
                features,
                axis=axis,
                name=name,
                kernel_init=nn.with_logical_partitioning(init, names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
            )

        q = dense((4, 8), ("embed", "heads", "kv"), name="query")(x)
        x = x + dense(32, ("heads", "kv", "embed"), axis=(-2, -1), name="out")(q)
        h = dense(64, ("embed", "mlp"), name="up")(x)
        return x + dense(32, ("mlp", "embed"), name="down")(h)


RULES = (("embed", "fsdp"), ("heads", "model"), ("mlp", "model"), ("kv", None))
LAYOUTS = {"query": "ioo", "out": "iio"}


def _boxed():
    return jax.eval_shape(Block().init, jax.random.key(0), jnp.ones((2, 32)))["params"]


def test_logical_boxes_with_rules():
    boxed = _boxed()
    config = jaxlora.LoraConfig(r=4, target_modules="all-linear", layouts=LAYOUTS, bias="all")
    got = lora_shardings(boxed, config, rules=RULES)
    assert got["query"] == {"lora_a": P("fsdp", None), "lora_b": P(None, "model", None),
                            "bias": P(None)}  # fmt: skip
    assert got["out"] == {"lora_a": P("model", None, None), "lora_b": P(None, "fsdp"),
                          "bias": P("fsdp")}  # fmt: skip
    assert got["up"]["lora_a"] == P("fsdp", None) and got["up"]["lora_b"] == P(None, "model")
    assert got["down"]["lora_a"] == P("model", None) and got["down"]["lora_b"] == P(None, "fsdp")
    # The same tree as the params' own shardings go through nn.logical_to_mesh_axes.
    base = jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(tuple(s), RULES), nn.get_partition_spec(boxed)
    )
    assert lora_shardings(nn.unbox(boxed), config, base) == got


def test_logical_boxes_without_rules_stay_logical():
    config = jaxlora.LoraConfig(r=4, target_modules=["query"], layouts=LAYOUTS)
    got = lora_shardings(_boxed(), config)
    assert got == {"query": {"lora_a": P("embed", None), "lora_b": P(None, "heads", "kv")}}


@pytest.mark.slow
def test_structure_matches_split_with_trainable_copies():
    params = nn.unbox(jax.jit(Block().init)(jax.random.key(0), jnp.ones((2, 32))))["params"]
    config = jaxlora.LoraConfig(
        r=4, target_modules=["query", "up"], layouts=LAYOUTS, bias="lora_only",
        modules_to_save=["down"],
    )  # fmt: skip
    specs = jax.tree.map(lambda _: P("fsdp"), params)
    _, lora = jaxlora.split(params, config, jax.random.key(1))
    got = lora_shardings(params, config, specs)
    assert jax.tree.structure(got) == jax.tree.structure(lora)
    assert got["down"] == {"kernel": P("fsdp"), "bias": P("fsdp")}
    assert got["up"]["bias"] == P("fsdp")


def test_named_shardings_keep_their_mesh_and_none_is_replicated():
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    params = {"a": {"kernel": jnp.zeros((8, 4))}, "b": {"kernel": jnp.zeros((8, 4))}}
    base = {"a": {"kernel": NamedSharding(mesh, P("fsdp", "model"))}, "b": {"kernel": None}}
    config = jaxlora.LoraConfig(r=2, target_modules=["a", "b"])
    got = lora_shardings(params, config, base, rank_axis="data")
    assert got["a"]["lora_a"] == NamedSharding(mesh, P("fsdp", "data"))
    assert got["a"]["lora_b"] == NamedSharding(mesh, P("data", "model"))
    assert got["b"] == {"lora_a": P(None, "data"), "lora_b": P("data", None)}
    other = AbstractMesh((4,), ("data",))
    got = lora_shardings(params, config, base, mesh=other)
    assert got["a"]["lora_a"].mesh == mesh and got["b"]["lora_a"] == NamedSharding(
        other, P(None, None)
    )


def test_placed_arrays_are_their_own_shardings():
    mesh = jax.make_mesh((1, 1), ("fsdp", "model"))
    kernel = jax.device_put(jnp.zeros((8, 4)), NamedSharding(mesh, P("fsdp", "model")))
    config = jaxlora.LoraConfig(r=2, target_modules=["a"])
    got = lora_shardings({"a": {"kernel": kernel}}, config)
    assert got["a"]["lora_a"] == NamedSharding(mesh, P("fsdp", None))


def test_rank_axis_must_divide_rank():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    config = jaxlora.LoraConfig(r=6, target_modules=["a"])
    params = {"a": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(ValueError, match=r"over 4 devices, but its rank is 6; expected a rank"):
        lora_shardings(params, config, {"a": {"kernel": P()}}, rank_axis="model", mesh=mesh)
    got = lora_shardings(params, config, {"a": {"kernel": P()}}, rank_axis="data", mesh=mesh)
    assert got["a"]["lora_b"].spec == P("data", None)


def test_missing_entry_is_named():
    config = jaxlora.LoraConfig(r=2, target_modules=["a"])
    params = {"a": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(ValueError, match=r"no entry for `a/kernel`; it must mirror `frozen`"):
        lora_shardings(params, config, {"params": {"a": {"kernel": P()}}})


def test_wrong_leaf_type():
    config = jaxlora.LoraConfig(r=2, target_modules=["a"])
    params = {"a": {"kernel": jnp.zeros((8, 4))}}
    with pytest.raises(TypeError, match=r"leaf at `\['a'\]\['kernel'\]` is a str; expected"):
        lora_shardings(params, config, {"a": {"kernel": "model"}})
    with pytest.raises(TypeError, match=r"has sharding .*; expected a NamedSharding"):
        lora_shardings({"a": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)}}, config)


# ---- init_sharded ---------------------------------------------------------------------------


def _mesh():
    return jax.make_mesh((1, 1, 1), MESH_AXES)


@pytest.mark.slow
def test_init_sharded_equals_split_and_carries_the_rule():
    params = nn.unbox(jax.jit(Block().init)(jax.random.key(0), jnp.ones((2, 32))))["params"]
    config = jaxlora.LoraConfig(
        r=4, target_modules="all-linear", layouts=LAYOUTS, bias="all", init_lora_weights=False
    )
    key = jax.random.key(3)
    boxed = _boxed()
    lora = init_sharded(params, config, key, boxed, mesh=_mesh(), rules=RULES)
    _, want = jaxlora.split(params, config, key)
    assert jax.tree.structure(lora) == jax.tree.structure(want)
    for got_leaf, want_leaf in zip(jax.tree.leaves(lora), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
    specs = lora_shardings(boxed, config, rules=RULES)
    assert jax.tree.map(lambda x: x.sharding.spec, lora) == specs
    assert lora["query"]["bias"] is not params["query"]["bias"]


def test_init_sharded_from_placed_params():
    mesh = _mesh()
    params = {"up": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}}
    specs = {"up": {"kernel": P("fsdp", "model"), "bias": P("model")}}
    placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    config = jaxlora.LoraConfig(r=2, target_modules=["up"], bias="all")
    lora = init_sharded(placed, config, jax.random.key(0))
    assert lora["up"]["lora_a"].sharding == NamedSharding(mesh, P("fsdp", None))
    assert lora["up"]["bias"].sharding.spec == P("model")
    before = placed["up"]["bias"].unsafe_buffer_pointer()
    assert lora["up"]["bias"].unsafe_buffer_pointer() != before


def test_init_sharded_needs_a_mesh():
    config = jaxlora.LoraConfig(r=2, target_modules=["up"])
    params = {"up": {"kernel": jnp.ones((8, 16))}}
    with pytest.raises(ValueError, match=r"PartitionSpecs without a mesh for up/lora_a"):
        init_sharded(params, config, jax.random.key(0), {"up": {"kernel": P()}})


def test_init_sharded_abstract_base_needs_trainable_values():
    config = jaxlora.LoraConfig(r=2, target_modules=["up"], bias="all")
    abstract = {
        "up": {
            "kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32),
            "bias": jax.ShapeDtypeStruct((16,), jnp.float32),
        }
    }
    specs = {"up": {"kernel": P(), "bias": P()}}
    with pytest.raises(ValueError, match=r"leaf `up/bias` is trained in full, so `init_sharded`"):
        init_sharded(abstract, config, jax.random.key(0), specs, mesh=_mesh())
    # Without trainable copies an abstract base is enough: nothing of W is read.
    config = jaxlora.LoraConfig(r=2, target_modules=["up"])
    lora = init_sharded(abstract, config, jax.random.key(0), specs, mesh=_mesh())
    assert lora["up"]["lora_a"].shape == (8, 2)


# ---- NNX: partitioning metadata on nnx.Param ------------------------------------------------


class NnxBlock(nnx.Module):
    """``Block`` in NNX: the same kernels with ``nnx.with_partitioning`` logical names."""

    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()

        def dense(cls, d_in, d_out, names, **kwargs):
            return cls(
                d_in,
                d_out,
                kernel_init=nnx.with_partitioning(init, names),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:]),
                rngs=rngs,
                **kwargs,
            )

        self.query = dense(nnx.LinearGeneral, 32, (4, 8), ("embed", "heads", "kv"))
        self.out = dense(nnx.LinearGeneral, (4, 8), 32, ("heads", "kv", "embed"), axis=(-2, -1))
        self.up = dense(nnx.Linear, 32, 64, ("embed", "mlp"))
        self.down = dense(nnx.Linear, 64, 32, ("mlp", "embed"))


def _nnx_abstract():
    """The abstract NNX model: shapes plus the logical names as ``out_sharding`` metadata."""
    with nnx.use_eager_sharding(False):  # logical names are no mesh axes: place nothing yet
        return nnx.eval_shape(lambda: NnxBlock(nnx.Rngs(0)))


def _nnx_state():
    return nnx.state(_nnx_abstract())


# Data, fully sharded and tensor parallel: the meshes and logical rules of train_parallel.py.
NNX_MESHES = {
    "dp": (AbstractMesh((8,), ("data",)), ()),
    "fsdp": (AbstractMesh((2, 4), ("data", "fsdp")), (("embed", "fsdp"),)),
    "tp": (AbstractMesh((2, 4), ("data", "model")), (("heads", "model"), ("mlp", "model"))),
}


@pytest.mark.parametrize("mesh_name", sorted(NNX_MESHES))
def test_nnx_partitioning_metadata_gives_linens_shardings(mesh_name):
    """Law: an NNX model and its linen twin with the same logical names get the same adapter
    shardings, each equal to the rule applied to ``nnx.get_partition_spec`` of the base."""
    mesh, rules = NNX_MESHES[mesh_name]
    state = _nnx_state()
    layouts = jaxlora.infer_layouts(_nnx_abstract())
    assert {k: layouts[k] for k in LAYOUTS} == LAYOUTS  # read off the NNX layers
    config = jaxlora.LoraConfig(r=4, target_modules="all-linear", layouts=layouts, bias="all")
    got = lora_shardings(state, config, mesh=mesh, rules=rules)
    linen = lora_shardings(_boxed(), config, mesh=mesh, rules=rules)
    assert got == linen
    specs = jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(tuple(s), rules), nnx.get_partition_spec(state)
    )
    pure = nnx.to_pure_dict(state)
    assert lora_shardings(pure, config, nnx.to_pure_dict(specs), mesh=mesh) == got
    if mesh_name == "tp":  # column parallel query/up: b sharded; row parallel out/down: a sharded
        assert got["query"]["lora_b"].spec == P(None, "model", None)
        assert got["out"]["lora_a"].spec == P("model", None, None)
        assert got["down"]["lora_a"].spec == P("model", None)
    if mesh_name == "fsdp":
        assert got["up"]["lora_a"].spec == P("fsdp", None)
        assert got["out"]["bias"].spec == P("fsdp")


def test_nnx_without_rules_stays_logical_and_unannotated_variables_are_replicated():
    state = _nnx_state()
    state["down"]["bias"].set_metadata("out_sharding", None)
    config = jaxlora.LoraConfig(r=4, target_modules=["up", "down"], bias="all")
    got = lora_shardings(state, config)
    assert got["up"] == {"lora_a": P("embed", None), "lora_b": P(None, "mlp"), "bias": P("mlp")}
    assert got["down"]["bias"] == P()


def test_nnx_eagerly_sharded_state_brings_its_mesh():
    mesh = jax.make_mesh((1, 1), ("fsdp", "model"))

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            names = (("fsdp", "model"), ("model", "fsdp"))
            init = nnx.initializers.lecun_normal()
            self.up, self.down = (
                nnx.Linear(8, 8, kernel_init=nnx.with_partitioning(init, n), rngs=rngs)
                for n in names
            )

    with jax.set_mesh(mesh):
        state = nnx.state(Mlp(nnx.Rngs(0)))
    config = jaxlora.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)
    got = lora_shardings(state, config)
    assert got["up"]["lora_a"] == NamedSharding(mesh, P("fsdp", None))
    assert got["down"]["lora_b"] == NamedSharding(mesh, P(None, "fsdp"))
    lora = init_sharded(state, config, jax.random.key(1))
    assert jax.tree.map(lambda x: x.sharding, lora) == got
    want = jaxlora.split(state, config, jax.random.key(1))[1]
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_nnx_init_sharded_from_metadata_and_rules():
    with nnx.use_eager_sharding(False):
        state = nnx.state(NnxBlock(nnx.Rngs(0)))
    layouts = {"query": "ioo", "out": "iio"}
    config = jaxlora.LoraConfig(r=4, target_modules=["query", "out", "up"], layouts=layouts,
                                bias="lora_only", init_lora_weights=False)  # fmt: skip
    rules = (("embed", "fsdp"), ("mlp", "model"))
    lora = init_sharded(state, config, jax.random.key(2), mesh=_mesh(), rules=rules)
    want_specs = lora_shardings(state, config, rules=rules)
    assert jax.tree.map(lambda x: x.sharding.spec, lora) == want_specs
    want = jaxlora.split(state, config, jax.random.key(2))[1]
    for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nnx_rules_from_the_context_or_the_variables_own_metadata():
    """nnx's own ways of naming rules (an ``nnx.logical_axis_rules`` context, per-variable
    ``sharding_rules``) give what ``rules=`` gives. nnx keeps a name its rules do not list (as a
    mesh axis) where linen's rules replicate it, so these rules name every logical axis."""
    rules = NNX_MESHES["tp"][1] + (("embed", None),)
    config = jaxlora.LoraConfig(r=4, target_modules=["up", "down"])
    want = lora_shardings(_nnx_state(), config, rules=rules)
    with nnx.logical_axis_rules(rules):
        assert lora_shardings(_nnx_state(), config) == want
    state = _nnx_state()
    for module in ("up", "down"):
        state[module]["kernel"].set_metadata("sharding_rules", rules)
    assert lora_shardings(state, config) == want
    assert want["up"]["lora_b"] == P(None, "model") and want["down"]["lora_a"] == P("model", None)
