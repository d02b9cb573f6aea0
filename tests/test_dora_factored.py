"""DoRA on the factored path (linen and NNX) equals DoRA merged, in outputs and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora
from tests import linen_models as lm
from tests.treeutil import assert_trees_close, perturbed

CASES = {
    "decoder": (lambda: lm.Decoder(), lm.ids, ["query", "out", "fc1", "fc2"]),
    "scanned": (lambda: lm.Decoder(scan=True), lm.ids, ["value", "fc1"]),
    "conv": (lambda: lm.ConvNet(), lm.images, ["conv1", "head"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_factored_dora_equals_merged_dora(case):
    make, inputs, targets = CASES[case]
    model, x = make(), inputs()
    params = lm.init(model, x)
    config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias="lora_only",
                                layouts=jaxlora.infer_layouts(model, x))  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(0), variant="dora")
    lora = perturbed(lora, 1, scale=0.05)  # factors and magnitudes all matter

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, frozen, lora, config, x, mode=mode) ** 2)

    factored = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "factored")
    merged = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "merged")
    reference = jnp.sum(model.apply({"params": jaxlora.merge(frozen, lora, config)}, x) ** 2)
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


def test_factored_dora_on_nnx_equals_merged_dora():
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 2, 6))
    config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["fc", "proj", "conv"],
                                layouts={"proj": "ioo", "conv": "wio"})  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(2), variant="dora")
    fresh = jaxlora.apply(graphdef, frozen, lora, config, x)
    assert_trees_close(fresh, nnx.merge(graphdef, state)(x), rtol=1e-5, atol=1e-5)
    lora = perturbed(lora, 3, scale=0.05)

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(graphdef, frozen, lora, config, x, mode=mode) ** 2)

    factored = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "factored")
    merged = jax.value_and_grad(loss)(lora, "merged")
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
