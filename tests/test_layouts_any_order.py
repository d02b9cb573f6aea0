"""Kernel layouts with any order of axes (``"oio"``, ``"ooio"``, ``"iio"``, ``"ioi"``, stacked):
inferred from linen and NNX models; merge, unmerge, the factored forward and PEFT files agree."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora import LoraConfig
from jaxlora._src import paths
from jaxlora._src.files.peft_layout import tensor_entries
from jaxlora._src.forward import lowrank

# The full suite only (91 compiled cases); tests/test_apply_guarantee.py has 'oio' cases in the
# fast core.
pytestmark = pytest.mark.slow

B, T, D, H, K, C = 2, 5, 8, 2, 4, 3

#: name: (einsum_str, kernel shape, input shape, layout the einsum gives its kernel)
CASES = {
    "oio": ("btd,hdk->bthk", (H, D, K), (B, T, D), "oio"),  # Gemma q (heads, d_model, head_dim)
    "ooio": ("btd,chdk->cbthk", (C, H, D, K), (B, T, D), "ooio"),  # fused kv
    "iio": ("bthk,hkd->btd", (H, K, D), (B, T, H, K), "iio"),
    "ioi": ("bthk,hdk->btd", (H, D, K), (B, T, H, K), "ioi"),
    "oi": ("btd,hd->bth", (H, D), (B, T, D), "oi"),  # a PyTorch-ordered Dense kernel
    "soi": ("btnd,nhd->btnh", (C, H, D), (B, T, C, D), "soi"),  # batched (per-group) einsum
}
#: name: (einsum_str, kernel shape of one layer, layout of the stacked kernel); H·K = D, so the
#: output folds back into the carry.
STACKED = {
    "soio": ("btd,hdk->bthk", (H, D, K), "soio"),
    "sooio": ("btd,chdk->btchk", (2, 2, D, 2), "sooio"),
    "sioi": ("bthk,hdk->btd", (H, D, K), "sioi"),
}


class Wrap(nn.Module):
    spec: str
    shape: tuple

    @nn.compact
    def __call__(self, x):
        return nn.Einsum(self.shape, self.spec, use_bias=False, name="proj")(x)


class Block(nn.Module):
    spec: str
    shape: tuple

    @nn.compact
    def __call__(self, x, _):
        y = nn.Einsum(self.shape, self.spec, use_bias=False, name="proj")(x)
        return x + jnp.tanh(y.reshape(x.shape)), None


class Scanned(nn.Module):
    spec: str
    shape: tuple

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(self.spec, self.shape, name="layers")(x, None)[0]


class NnxWrap(nnx.Module):
    def __init__(self, spec, shape, rngs):
        self.proj = nnx.Einsum(spec, shape, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class NnxBlock(nnx.Module):
    def __init__(self, spec, shape, rngs):
        self.proj = nnx.Einsum(spec, shape, rngs=rngs)


class NnxStacked(nnx.Module):
    """Blocks made with ``nnx.vmap`` and run with ``nnx.scan``: a stacked einsum kernel."""

    def __init__(self, spec, shape, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(spec, shape, rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return x + jnp.tanh(block.proj(x).reshape(x.shape))

        return body(x, self.layers)


def _linen(spec, shape, x_shape, stacked):
    model = Scanned(spec, shape) if stacked else Wrap(spec, shape)
    x = jax.random.normal(jax.random.key(3), x_shape)
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, jaxlora.infer_layouts(model, x), x


def _nnx(spec, shape, x_shape, stacked):
    model = (NnxStacked if stacked else NnxWrap)(spec, shape, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), x_shape)
    layouts = jaxlora.infer_layouts(model)
    graphdef, state = nnx.split(model)
    return graphdef, state, layouts, x


def _all_cases():
    for name, (spec, shape, x_shape, layout) in CASES.items():
        yield name, spec, shape, x_shape, layout, False
    for name, (spec, shape, layout) in STACKED.items():
        yield name, spec, shape, (B, T, D) if layout != "sioi" else (B, T, H, K), layout, True


CASE_IDS = [f"{c[0]}" for c in _all_cases()]


@pytest.fixture(params=list(_all_cases()), ids=CASE_IDS)
def case(request):
    return request.param


@functools.cache
def _setup(framework, case):
    name, spec, shape, x_shape, layout, stacked = case
    model, frozen, layouts, x = (_linen if framework == "linen" else _nnx)(
        spec, shape, x_shape, stacked
    )
    path = "layers/proj" if stacked else "proj"
    assert layouts == {path: layout}
    config = LoraConfig(
        r=3, lora_alpha=6, target_modules=["proj"], layouts=layouts, init_lora_weights=False
    )
    _, lora = jaxlora.split(frozen, config, jax.random.key(1))
    return model, frozen, lora, config, x, path


def numpy_merge(w, a, b, scale, layout):
    """``W + s·A·B`` with A / B in canonical order, permuted into ``layout`` order by numpy."""
    perm = [k for letter in "swio" for k, c in enumerate(layout) if c == letter]
    canonical = np.transpose(np.asarray(w, np.float64), perm)
    n_stack, n_out = layout.count("s"), layout.count("o")
    stack = canonical.shape[:n_stack]
    fan_out = int(np.prod(canonical.shape[len(layout) - n_out :]))
    a2 = np.asarray(a, np.float64).reshape(stack + (-1, a.shape[-1]))
    b2 = np.asarray(b, np.float64).reshape(stack + (b.shape[n_stack], fan_out))
    merged = canonical + scale * np.matmul(a2, b2).reshape(canonical.shape)
    return np.transpose(merged, np.argsort(perm))


def _kernel(tree, path):
    return np.asarray(paths.by_path(tree)[path + "/kernel"])


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_merge_permutes_the_update_into_kernel_order(framework, case):
    _, frozen, lora, config, _, path = _setup(framework, case)
    merged = jaxlora.merge(frozen, lora, config)
    factors = paths.by_path(lora)
    expected = numpy_merge(
        _kernel(frozen, path), factors[path + "/lora_a"], factors[path + "/lora_b"], 2.0, case[4]
    )
    np.testing.assert_allclose(_kernel(merged, path), expected, rtol=1e-5, atol=1e-5)
    back = jaxlora.unmerge(merged, lora, config)
    np.testing.assert_allclose(_kernel(back, path), _kernel(frozen, path), atol=1e-5)


#: Without jit the law is checked on one plain and one stacked layout: eager and jitted calls run
#: the same jaxlora code, and every case costs whole-model traces either way.
EAGER_CASES = ("oio", "sioi")
JIT_AND_EAGER = [pytest.param(c, True, id=f"{c[0]}-jit") for c in _all_cases()] + [
    pytest.param(c, False, id=f"{c[0]}-eager") for c in _all_cases() if c[0] in EAGER_CASES
]


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize(("case", "use_jit"), JIT_AND_EAGER)
def test_factored_equals_merged_outputs_and_gradients(framework, case, use_jit):
    model, frozen, lora, config, x, _ = _setup(framework, case)

    def loss(lora, mode):
        y = jaxlora.apply(model, frozen, lora, config, x, mode=mode)
        weights = jax.random.normal(jax.random.key(4), y.shape)
        return jnp.sum(y * weights), y

    grad = jax.grad(loss, has_aux=True)
    if use_jit:
        grad = jax.jit(grad, static_argnums=1)
    g_factored, y_factored = grad(lora, "factored")
    g_merged, y_merged = grad(lora, "merged")
    np.testing.assert_allclose(y_factored, y_merged, rtol=1e-4, atol=1e-4)
    for got, want in zip(jax.tree.leaves(g_factored), jax.tree.leaves(g_merged), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _layer_name(path, index):
    return path.replace("/", ".") + "".join(f".{i}" for i in index)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_peft_round_trip(framework, case, tmp_path):
    _, frozen, lora, config, _, _ = _setup(framework, case)
    jaxlora.save_peft(tmp_path, lora, config, frozen, module_name=_layer_name)
    loaded, loaded_config = jaxlora.load_peft(
        tmp_path, frozen, module_name=_layer_name, layouts=config.layouts
    )
    assert jax.tree.structure(loaded) == jax.tree.structure(lora)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        jax.tree.leaves(jaxlora.merge(frozen, loaded, loaded_config)),
        jax.tree.leaves(jaxlora.merge(frozen, lora, config)),
        rtol=1e-6,
    )


def test_peft_shapes_flatten_inputs_and_outputs_in_kernel_order():
    frozen = {"q": {"kernel": jnp.zeros((H, D, K))}}
    config = LoraConfig(r=3, target_modules=["q"], layouts={"q": "oio"})
    entries = tensor_entries(frozen, config, lambda p, i: p)
    assert [e.peft_shape for e in entries] == [(3, D), (H * K, 3)]
    _, lora = jaxlora.split(frozen, config, jax.random.key(0))
    assert jax.tree.map(jnp.shape, lora) == {"q": {"lora_a": (D, 3), "lora_b": (3, H, K)}}


def test_saved_module_kernel_in_any_order_round_trips(tmp_path):
    frozen = {
        "q": {"kernel": jnp.zeros((8, 8))},
        "head": {"kernel": jnp.arange(24.0).reshape(2, 3, 4)},
    }
    config = LoraConfig(
        r=2, target_modules=["q"], modules_to_save=["head"], layouts={"head": "oio"}
    )
    _, lora = jaxlora.split(frozen, config, jax.random.key(0))
    jaxlora.save_peft(tmp_path, lora, config, frozen)
    loaded, _ = jaxlora.load_peft(tmp_path, frozen, layouts=config.layouts)
    np.testing.assert_array_equal(loaded["head"]["kernel"], frozen["head"]["kernel"])
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.head.weight"]
    want = np.transpose(np.arange(24.0).reshape(2, 3, 4), (1, 0, 2)).reshape(3, 8).T
    np.testing.assert_array_equal(saved, want)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("iso", "stacked axes 's' must lead"),
        ("ooo", "at least one input axis 'i' and one output axis 'o'"),
        ("iox", r"letters \['x'\]"),
        (3, "it is a int"),
    ],
)
def test_bad_layouts_name_the_field(layout, match):
    with pytest.raises(ValueError, match=r"`layouts\['q'\]` must be a layout string.*" + match):
        LoraConfig(target_modules=["q"], layouts={"q": layout})


@pytest.mark.parametrize("name", list(CASES))
def test_lowrank_einsum_is_the_change_of_the_layer_output(name):
    """The factored term alone, framework-free: ``einsum(x, W + ΔW) - einsum(x, W)``."""
    spec, shape, x_shape, layout = CASES[name]
    w = jax.random.normal(jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), x_shape)
    config = LoraConfig(r=3, target_modules=["q"], layouts={"q": layout}, init_lora_weights=False)
    frozen, lora = jaxlora.split({"q": {"kernel": w}}, config, jax.random.key(2))
    a, b = lora["q"]["lora_a"], lora["q"]["lora_b"]
    term = lowrank.einsum("q", spec, shape, x, a, b, 0.5, None, layout=layout)
    delta = numpy_merge(np.zeros(shape), a, b, 0.5, layout)
    want = np.einsum(spec, np.asarray(x, np.float64), delta)
    np.testing.assert_allclose(term, want, rtol=1e-5, atol=1e-5)


def test_einsum_that_disagrees_with_the_layouts_is_refused():
    model, params, _, x = _linen("btd,hdk->bthk", (4, 4, 4), (B, T, 4), False)
    config = LoraConfig(r=2, target_modules=["proj"], layouts={"proj": "ioo"})
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match="cannot split the Einsum kernel at `proj`.*'oio'"):
        lowrank.einsum(
            "proj", "btd,hdk->bthk", (4, 4, 4), x, lora["proj"]["lora_a"],
            lora["proj"]["lora_b"], 1.0, None, layout="ioo",
        )  # fmt: skip


class CallSpec(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((H, D, K), name="proj")(x, "btd,hdk->bthk")


def test_infer_layouts_reads_a_spec_given_to_the_call():
    assert jaxlora.infer_layouts(CallSpec(), jnp.ones((B, T, D))) == {"proj": "oio"}


def test_einsum_factors_split_with_another_layout_are_refused():
    x = jnp.ones((B, T, D))
    a, b = jnp.ones((H, 2)), jnp.ones((2, D, K))  # made for "ioo", the kernel is "oio"
    with pytest.raises(ValueError, match=r"cannot split the Einsum kernel.*'oio'.*\(8, 2\)"):
        lowrank.einsum("proj", "btd,hdk->bthk", (H, D, K), x, a, b, 1.0, None)


def test_infer_layouts_leaves_out_kernels_no_layout_describes():
    model = Wrap("btd,hkd->bthk", (H, K, D))
    assert jaxlora.infer_layouts(model, jnp.ones((B, T, D))) == {"proj": "ooi"}
    summed = Wrap("btd,hd->bt", (H, D))  # h is summed over the kernel alone
    assert jaxlora.infer_layouts(summed, jnp.ones((B, T, D))) == {}
    model = NnxWrap("btnd,dnh->btnh", (D, C, H), nnx.Rngs(0))  # batch axis after the input
    assert jaxlora.infer_layouts(model) == {}


def test_fold_reads_the_layout_not_the_shapes():
    """Equal sizes: only the layout tells ``"oio"`` from ``"ioo"``."""
    w = jax.random.normal(jax.random.key(0), (4, 4, 4))
    for layout in ("oio", "ioo", "ooi", "oii"):
        config = LoraConfig(r=2, target_modules=["q"], layouts={"q": layout},
                            init_lora_weights=False)  # fmt: skip
        frozen, lora = jaxlora.split({"q": {"kernel": w}}, config, jax.random.key(1))
        got = jaxlora.merge(frozen, lora, config)["q"]["kernel"]
        want = numpy_merge(w, lora["q"]["lora_a"], lora["q"]["lora_b"], 4.0, layout)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@st.composite
def kernels(draw):
    n_stack = draw(st.integers(0, 1))
    body = draw(st.lists(st.sampled_from("wio"), min_size=0, max_size=2))
    body = draw(st.permutations(["i", "o", *body]))
    layout = "s" * n_stack + "".join(body)
    shape = tuple(draw(st.integers(1, 4)) for _ in layout)
    return layout, shape, draw(st.integers(1, 3)), draw(st.integers(0, 2**16))


@given(kernels())
def test_merge_is_base_plus_permuted_update(drawn):
    layout, shape, rank, seed = drawn
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)  # no compile
    config = LoraConfig(r=rank, lora_alpha=3, target_modules=["m"], layouts={"m": layout},
                        init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split({"m": {"kernel": w}}, config, jax.random.key(seed + 1))
    merged = jaxlora.merge(frozen, lora, config)["m"]["kernel"]
    want = numpy_merge(w, lora["m"]["lora_a"], lora["m"]["lora_b"], 3 / rank, layout)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)
    back = jaxlora.unmerge(jaxlora.merge(frozen, lora, config), lora, config)["m"]["kernel"]
    np.testing.assert_allclose(back, w, atol=1e-5)


def test_sharding_specs_follow_the_layout():
    from jax.sharding import PartitionSpec as P

    frozen = {"q": {"kernel": jnp.zeros((H, D, K))}}
    config = LoraConfig(r=3, target_modules=["q"], layouts={"q": "oio"})
    [target] = jaxlora.find_targets(frozen, config)
    a, b = jaxlora.sharding.factor_specs(target, P("model", "fsdp"))
    assert (a, b) == (P("fsdp", None), P(None, "model", None))
