"""The DoRA variant: a fresh adapter is a no-op, the merge equals the dense formula, the column
norm is a constant in the backward pass, and the factored path (linen and NNX) equals the merged
one in outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import variants
from tests import linen_models as lm
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close, perturbed

CASES = [((24, 16), "io"), ((3, 12, 8), "sio"), ((3, 3, 4, 6), "wwio")]


def _setup(shape, layout, init=True):
    w = jax.random.normal(jax.random.key(0), shape)
    params = {"m": {"kernel": w, "bias": jnp.ones(shape[-1])}}
    config = jaxlora.LoraConfig(
        r=2, lora_alpha=4, target_modules=["m"], layouts={"m": layout}, init_lora_weights=init
    )
    return params, config


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.slow
def test_fresh_adapter_is_bitwise_noop_eager_and_close_under_jit(shape, layout):
    params, config = _setup(shape, layout)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    n_stack = layout.count("s")
    assert lora["m"][variants.LORA_MAGNITUDE].shape == shape[:n_stack] + shape[-1:]
    # Eager: m and ‖W‖_c come from the same computation, so m / ‖W‖_c is exactly 1.
    assert_trees_bitwise_equal(jaxlora.merge(frozen, lora, config), params)
    # Under jit the norm may be reduced in another order: equal within float32 rounding.
    jitted = jax.jit(jaxlora.merge)(frozen, lora, config)
    assert_trees_close(jitted, params, rtol=1e-6, atol=1e-7)


def _dense_formula(w, a, b, m, scale, layout):
    """DoRA by hand in float64: m · V / ‖V‖_c with V = W + s·A·B, per stack index."""
    w, a, b, m = (np.asarray(x, np.float64) for x in (w, a, b, m))
    n_stack, n_out = layout.count("s"), layout.count("o")
    stack = w.shape[:n_stack]
    fan_in = int(np.prod(w.shape[n_stack : w.ndim - n_out]))
    w2 = w.reshape(stack + (fan_in, -1))
    v = w2 + scale * (a.reshape(stack + (fan_in, -1)) @ b.reshape(stack + (a.shape[-1], -1)))
    norm = np.sqrt((v**2).sum(axis=-2, keepdims=True))
    return (m.reshape(stack + (1, -1)) * v / norm).reshape(w.shape)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.slow
def test_merge_equals_dense_formula(shape, layout, use_jit):
    params, config = _setup(shape, layout, init=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    lora["m"][variants.LORA_MAGNITUDE] = lora["m"][variants.LORA_MAGNITUDE] * 1.5 + 0.25
    merge = jax.jit(jaxlora.merge) if use_jit else jaxlora.merge
    merged = merge(frozen, lora, config)
    m = lora["m"]
    expected = _dense_formula(
        params["m"]["kernel"], m["lora_a"], m["lora_b"], m[variants.LORA_MAGNITUDE], 2.0, layout
    )
    np.testing.assert_allclose(merged["m"]["kernel"], expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["m"]["bias"], params["m"]["bias"])


@pytest.mark.slow
def test_gradient_treats_the_norm_as_a_constant():
    params, config = _setup((16, 8), "io", init=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    x = jax.random.normal(jax.random.key(2), (5, 16))
    w = params["m"]["kernel"]

    def loss(lora):
        return jnp.sum(jnp.tanh(x @ jaxlora.merge(frozen, lora, config)["m"]["kernel"]))

    def by_hand(lora, detach=True):
        a, b, m = lora["m"]["lora_a"], lora["m"]["lora_b"], lora["m"][variants.LORA_MAGNITUDE]
        v = w + 2.0 * (a @ b)
        norm = jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
        norm = jax.lax.stop_gradient(norm) if detach else norm
        return jnp.sum(jnp.tanh(x @ (m[None, :] * v / norm)))

    grads = jax.grad(loss)(lora)
    assert_trees_close(grads, jax.grad(by_hand)(lora), rtol=1e-4, atol=1e-6)
    # The stop-gradient matters: differentiating through the norm gives other factor gradients.
    through = jax.grad(lambda t: by_hand(t, detach=False))(lora)
    assert not np.allclose(grads["m"]["lora_a"], through["m"]["lora_a"], rtol=1e-3)


def test_plain_lora_modules_merge_beside_dora_ones():
    params = {
        "d": {"kernel": jax.random.normal(jax.random.key(0), (8, 4))},
        "p": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))},
    }
    config = jaxlora.LoraConfig(r=2, target_modules=["d", "p"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(2), variant="dora")
    del lora["p"][variants.LORA_MAGNITUDE]
    merged = jaxlora.merge(frozen, lora, config)
    plain = jaxlora.merge(frozen, {"p": lora["p"]}, config)
    np.testing.assert_array_equal(merged["p"]["kernel"], plain["p"]["kernel"])


def test_errors():
    params = {"emb": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(
        ValueError, match=r"DoRA adapts dense and conv kernels; `emb` is an embedding"
    ):
        jaxlora.split(
            params, jaxlora.LoraConfig(target_modules=["emb"]), jax.random.key(0), variant="dora"
        )
    params, config = _setup((8, 4), "io")
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    bad = {"m": {**lora["m"], variants.LORA_MAGNITUDE: jnp.ones(3)}}
    with pytest.raises(ValueError, match=r"`lora_magnitude` at `m` has shape \(3,\); the kernel"):
        jaxlora.merge(frozen, bad, config)
    with pytest.raises(
        ValueError, match=r"`lora` has `lora_magnitude` but no `lora_a`/`lora_b` at `m`"
    ):
        jaxlora.merge(frozen, {"m": {variants.LORA_MAGNITUDE: jnp.ones(4)}}, config)
    with pytest.raises(
        ValueError, match=r"`lora` leaves x/lora_a, x/lora_b, x/lora_magnitude have"
    ):
        jaxlora.merge(frozen, {"x": lora["m"]}, config)


@pytest.mark.slow
def test_magnitude_factor_is_the_factored_form():
    params, config = _setup((16, 8), "io", init=False)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    m = lora["m"]
    m[variants.LORA_MAGNITUDE] = m[variants.LORA_MAGNITUDE] * 0.5
    x = jax.random.normal(jax.random.key(2), (5, 16))
    w = params["m"]["kernel"]
    factor = variants.magnitude_factor(w, m["lora_a"], m["lora_b"], m[variants.LORA_MAGNITUDE], 2.0)
    factored = (x @ w + 2.0 * ((x @ m["lora_a"]) @ m["lora_b"])) * factor[None, :]
    merged = x @ jaxlora.merge(frozen, lora, config)["m"]["kernel"]
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)


FACTORED_CASES = {
    "decoder": (lambda: lm.Decoder(), lm.ids, ["query", "out", "fc1", "fc2"]),
    "scanned": (lambda: lm.Decoder(scan=True), lm.ids, ["value", "fc1"]),
    "conv": (lambda: lm.ConvNet(), lm.images, ["conv1", "head"]),
}


@pytest.mark.parametrize("case", sorted(FACTORED_CASES))
@pytest.mark.slow
def test_factored_dora_equals_merged_dora(case):
    make, inputs, targets = FACTORED_CASES[case]
    model, x = make(), inputs()
    params = lm.init(model, x)
    config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias="lora_only",
                                layouts=jaxlora.infer_layouts(model, x))  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(0), variant="dora")
    lora = perturbed(lora, 1, scale=0.05)  # factors and magnitudes all matter

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, frozen, lora, config, x, mode=mode) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    factored, merged = value_and_grad(lora, "factored"), value_and_grad(lora, "merged")
    merged_params = jaxlora.merge(frozen, lora, config)
    reference = jax.jit(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(merged_params)
    assert float(jnp.abs(factored[0] - reference)) <= 1e-4 * float(jnp.abs(reference))
    assert float(jnp.abs(factored[0] - merged[0])) <= 1e-4 * float(jnp.abs(merged[0]))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(merged[1]))
    assert_trees_close(factored[1], merged[1], rtol=1e-4, atol=1e-4 * scale)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, rngs=rngs)
        self.proj = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
        self.conv = nnx.Conv(3, 4, (3,), rngs=rngs)

    def __call__(self, x):
        h = self.proj(jnp.tanh(self.fc(x)))
        return self.conv(h)


@pytest.mark.slow
def test_factored_dora_on_nnx_equals_merged_dora():
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 2, 6))
    config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["fc", "proj", "conv"],
                                layouts={"proj": "ioo", "conv": "wio"})  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(2), variant="dora")
    fresh = jax.jit(lambda lora: jaxlora.apply(graphdef, frozen, lora, config, x))(lora)
    base = jax.jit(lambda state: nnx.merge(graphdef, state)(x))(state)
    assert_trees_close(fresh, base, rtol=1e-5, atol=1e-5)
    lora = perturbed(lora, 3, scale=0.05)

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(graphdef, frozen, lora, config, x, mode=mode) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    factored, merged = value_and_grad(lora, "factored"), value_and_grad(lora, "merged")
    assert float(jnp.abs(factored[0] - merged[0])) <= 1e-5 * float(jnp.abs(merged[0]))
    assert jax.tree.structure(factored[1]) == jax.tree.structure(lora)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(merged[1]))
    assert_trees_close(factored[1], merged[1], rtol=1e-4, atol=1e-4 * scale)


def test_dora_errors():
    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(8, 4, name="embed")(ids)

    model = Embedder()
    ids = jnp.zeros((2,), jnp.int32)
    eparams = model.init(jax.random.key(0), ids)["params"]
    ecfg = jaxlora.LoraConfig(r=2, target_modules=["embed"])
    efrozen, elora = jaxlora.split(eparams, ecfg, jax.random.key(0))
    elora["embed"]["lora_magnitude"] = jnp.ones(4)
    with pytest.raises(ValueError, match="DoRA adapts dense and conv kernels; `embed` is an emb"):
        jaxlora.apply(model, efrozen, elora, ecfg, ids)
