"""DoRA on the factored path equals DoRA merged, in outputs and gradients, for each layer kind."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlora
from jaxlora import dora
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
    frozen, lora = dora.dora_split(params, config, jax.random.key(0))
    lora = perturbed(lora, 1, scale=0.05)  # factors and magnitudes all matter

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, frozen, lora, config, x, mode=mode) ** 2)

    factored = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "factored")
    merged = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "merged")
    reference = jnp.sum(model.apply({"params": dora.dora_merge(frozen, lora, config)}, x) ** 2)
    assert float(jnp.abs(factored[0] - reference)) <= 1e-4 * float(jnp.abs(reference))
    assert float(jnp.abs(factored[0] - merged[0])) <= 1e-4 * float(jnp.abs(merged[0]))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(merged[1]))
    assert_trees_close(factored[1], merged[1], rtol=1e-4, atol=1e-4 * scale)


def test_fresh_dora_adapter_changes_nothing_on_the_factored_path():
    model, x = lm.Decoder(), lm.ids()
    params = lm.init(model, x)
    config = jaxlora.LoraConfig(r=2, target_modules=["fc1"])
    frozen, lora = dora.dora_split(params, config, jax.random.key(0))
    y = jaxlora.apply(model, frozen, lora, config, x)
    assert jnp.allclose(y, model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_dora_errors():
    config = jaxlora.LoraConfig(r=2, target_modules=["kernel_holder"])
    params = {"kernel_holder": {"kernel": jnp.ones((4, 4))}}
    frozen, lora = dora.dora_split(params, config, jax.random.key(0))
    with pytest.raises(ValueError, match="DoRA adapter; DoRA runs on linen models only"):
        jaxlora.apply(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), frozen, lora, config, jnp.ones((1, 4)))

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
    with pytest.raises(ValueError, match="`embed` is an embedding with a DoRA magnitude"):
        jaxlora.apply(model, efrozen, elora, ecfg, ids)
