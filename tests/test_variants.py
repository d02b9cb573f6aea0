"""LoRA variants behind one interface: ``split(variant=...)``, ``merge`` and ``unmerge`` fold each
module through its own variant (told from Θ's leaves), on float and quantised bases, and a new
variant registered from outside runs through ``split``, ``merge`` and both ``apply`` paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import quant, variants
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close, perturbed


def _params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "fc1": {"kernel": jax.random.normal(keys[0], (64, 32)), "bias": jnp.ones(32)},
        "fc2": {"kernel": jax.random.normal(keys[1], (32, 64)), "bias": jnp.zeros(64)},
    }


CONFIG = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])


@pytest.mark.slow
def test_split_variant_dora_adds_column_norms():
    params = _params()
    _, lora = jaxlora.split(params, CONFIG, jax.random.key(1), variant="dora")
    _, plain = jaxlora.split(params, CONFIG, jax.random.key(1))
    for name in ("fc1", "fc2"):
        module = dict(lora[name])
        magnitude = module.pop(variants.LORA_MAGNITUDE)
        assert_trees_bitwise_equal(module, plain[name])  # the same factors as plain LoRA
        norm = jnp.sqrt(jnp.sum(params[name]["kernel"] ** 2, axis=0))
        np.testing.assert_allclose(magnitude, norm, rtol=1e-6)
    assert variants.variants_in(lora) == {"dora"}
    assert variants.adapter_variant(lora) == "dora"


def test_merge_of_a_fresh_dora_adapter_is_the_base_bit_for_bit():
    params = _params()
    frozen, lora = jaxlora.split(params, CONFIG, jax.random.key(1), variant="dora")
    assert_trees_bitwise_equal(jaxlora.merge(frozen, lora, CONFIG), params)


def test_merge_of_a_dora_adapter_is_the_dora_kernel():
    params = _params()
    frozen, lora = jaxlora.split(params, CONFIG, jax.random.key(1), variant="dora")
    lora = perturbed(lora, 2, scale=0.1)
    merged = jaxlora.merge(frozen, lora, CONFIG)
    for name in ("fc1", "fc2"):
        m = lora[name]
        expected = variants.dora_kernel(
            params[name]["kernel"], m["lora_a"], m["lora_b"], m["lora_magnitude"], 2.0
        )
        np.testing.assert_array_equal(merged[name]["kernel"], expected)
    assert_trees_bitwise_equal(merged, jaxlora.merge(frozen, lora, CONFIG))


def test_unmerge_of_dora_says_it_cannot_and_what_to_do():
    frozen, lora = jaxlora.split(_params(), CONFIG, jax.random.key(1), variant="dora")
    merged = jaxlora.merge(frozen, lora, CONFIG)
    with pytest.raises(ValueError, match=r"`fc1` is a DoRA module.*Keep the base params and merge"):
        jaxlora.unmerge(merged, lora, CONFIG)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.slow
def test_merge_on_a_quantised_base_is_merge_on_the_dequantised_base(method, variant):
    qfrozen = quant.quantize(_params(), CONFIG, method)
    base = quant.dequantize_tree(qfrozen)
    _, lora = jaxlora.split(base, CONFIG, jax.random.key(1), variant=variant)
    lora = perturbed(lora, 2, scale=0.1)
    expected = jaxlora.merge(base, lora, CONFIG)
    assert_trees_bitwise_equal(jaxlora.merge(qfrozen, lora, CONFIG), expected)
    assert_trees_bitwise_equal(quant.merge_quantized(qfrozen, lora, CONFIG), expected)


def test_unmerge_on_a_quantised_base_dequantises():
    qfrozen = quant.quantize(_params(), CONFIG, "nf4")
    _, lora = quant.split_quantized(qfrozen, CONFIG, jax.random.key(1))
    lora = perturbed(lora, 2, scale=0.1)
    expected = jaxlora.unmerge(quant.dequantize_tree(qfrozen), lora, CONFIG)
    assert_trees_bitwise_equal(jaxlora.unmerge(qfrozen, lora, CONFIG), expected)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="fc2")(jnp.tanh(nn.Dense(32, name="fc1")(x)))


@pytest.mark.slow
def test_factored_dora_on_a_quantised_linen_base_equals_merged():
    model, x = Mlp(), jax.random.normal(jax.random.key(3), (4, 64))
    params = model.init(jax.random.key(0), x)["params"]
    qfrozen = quant.quantize(params, CONFIG, "nf4")
    _, lora = jaxlora.split(quant.dequantize_tree(qfrozen), CONFIG, jax.random.key(1),
                            variant="dora")  # fmt: skip
    lora = perturbed(lora, 2, scale=0.05)

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, qfrozen, lora, CONFIG, x, mode=mode) ** 2)

    factored = jax.value_and_grad(loss)(lora, "factored")
    merged = jax.value_and_grad(loss)(lora, "merged")
    np.testing.assert_allclose(factored[0], merged[0], rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(merged[1]))
    assert_trees_close(factored[1], merged[1], rtol=1e-4, atol=1e-4 * scale)


class Gated(variants.Variant):
    """A toy variant for the test: a trainable scalar gate ``g`` per module, ``W + g·s·A·B``."""

    name = "gated"
    extra_leaves = ("lora_gate",)

    def init(self, target, weight, config):
        return {"lora_gate": jnp.ones(target.shape[: target.n_stack], config.dtype)}

    def merge(self, weight, a, b, extras, scale, n_stack, where):
        g = extras["lora_gate"].astype(jnp.float32)
        return (weight + g * scale * (a @ b)).astype(weight.dtype)

    def unmerge(self, merged, a, b, extras, scale, n_stack, where):
        g = extras["lora_gate"].astype(jnp.float32)
        return (merged - g * scale * (a @ b)).astype(merged.dtype)

    def factored(self, y, term, weight, bias, a, b, extras, scale):
        return y + (extras["lora_gate"] * term).astype(y.dtype)


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 64, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def _array(leaf):
    """A linen array or an NNX state's variable, as numpy."""
    return np.asarray(jax.tree.leaves(leaf)[0])


@pytest.fixture
def gated():
    variants.register(Gated())
    yield
    variants.unregister("gated")


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.slow
def test_a_third_variant_is_one_registration(gated, framework):
    x = jax.random.normal(jax.random.key(3), (4, 64))
    if framework == "linen":
        model = Mlp()
        params = model.init(jax.random.key(0), x)["params"]
    else:
        model, params = nnx.split(NnxMlp(nnx.Rngs(0)))
    config = jaxlora.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="gated")
    assert variants.variants_in(lora) == {"gated"}
    lora["fc1"]["lora_gate"] = jnp.asarray(0.5)
    merged = jaxlora.merge(frozen, lora, config)
    w = _array(params["fc1"]["kernel"])
    a, b = np.asarray(lora["fc1"]["lora_a"]), np.asarray(lora["fc1"]["lora_b"])
    scale = config.scale_for("fc1", 4)
    np.testing.assert_allclose(_array(merged["fc1"]["kernel"]), w + 0.5 * scale * a @ b, atol=1e-5)
    restored = jaxlora.unmerge(merged, lora, config)
    np.testing.assert_allclose(_array(restored["fc1"]["kernel"]), w, atol=1e-5)
    factored = jaxlora.apply(model, frozen, lora, config, x)
    np.testing.assert_allclose(
        factored, jaxlora.apply(model, frozen, lora, config, x, mode="merged"), atol=1e-4
    )
    grads = jax.grad(lambda t: jnp.sum(jaxlora.apply(model, frozen, t, config, x) ** 2))(lora)
    assert float(jnp.abs(grads["fc1"]["lora_gate"])) > 0


def test_registry_errors():
    with pytest.raises(TypeError, match=r"`variant` must be a Variant, got str"):
        variants.register("gated")
    with pytest.raises(ValueError, match=r"a variant named `dora` is registered already"):
        variants.register(variants.DORA)
    with pytest.raises(ValueError, match=r"`variant` must be one of \['dora', 'lora'"):
        variants.get("nope")
    variants.register(Gated())
    try:
        clash = type("Clash", (Gated,), {"name": "clash"})()
        with pytest.raises(ValueError, match=r"variant `clash` has the extra leaves of `gated`"):
            variants.register(clash)
        both = {"lora_a": 0, "lora_b": 0, "lora_magnitude": 0, "lora_gate": 0}
        with pytest.raises(ValueError, match=r"`q` fits the variants \['dora', 'gated'\]"):
            variants.variant_of(both, "q")
        dora = {"lora_a": 0, "lora_b": 0, "lora_magnitude": 0}
        gated = {"lora_a": 0, "lora_b": 0, "lora_gate": 0}
        with pytest.raises(ValueError, match=r"`lora` mixes the variants \['dora', 'gated'\]"):
            variants.adapter_variant({"q": dora, "k": gated})
    finally:
        variants.unregister("gated")
