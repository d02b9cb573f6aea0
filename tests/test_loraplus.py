"""LoRA+: B's learning rate is ``ratio`` times A's; embeddings get their own rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import loraplus


def _lora():
    params = {
        "q": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)},
        "emb": {"embedding": jnp.ones((10, 6))},
    }
    config = jaxlora.LoraConfig(r=2, target_modules=["q", "emb"], bias="lora_only")
    frozen, lora = jaxlora.split(params, config, jax.random.key(0))
    embeds = [t.path for t in jaxlora.find_targets(params, config) if t.kind == "embed"]
    return frozen, lora, config, embeds


@pytest.mark.parametrize("use_jit", [False, True])
def test_b_update_is_ratio_times_a_update_under_sgd(use_jit):
    _, lora, _, embeds = _lora()
    opt = loraplus.loraplus(optax.sgd, 0.01, ratio=16.0, embedding_lr=0.5, embedding_paths=embeds)
    grads = jax.tree.map(jnp.ones_like, lora)
    step = jax.jit(opt.update) if use_jit else opt.update
    updates, _ = step(grads, opt.init(lora))
    q = updates["q"]
    np.testing.assert_allclose(q["lora_a"], -0.01 * np.ones((8, 2)), rtol=1e-6)
    np.testing.assert_allclose(q["lora_b"], -0.16 * np.ones((2, 6)), rtol=1e-6)
    np.testing.assert_allclose(q["bias"], -0.16 * np.ones(6), rtol=1e-6)  # 1-D: B's group
    for factor in ("lora_a", "lora_b"):
        np.testing.assert_allclose(updates["emb"][factor], -0.5 * np.ones_like(lora["emb"][factor]))


def test_schedules_are_scaled_and_embeddings_found_in_a_combined_tree():
    frozen, lora, _, _ = _lora()
    combined = jaxlora.combine(frozen, lora)
    labels = loraplus.loraplus_labels(combined)
    assert labels["emb"]["lora_a"] == "embedding" and labels["q"]["lora_b"] == "lora_b"
    opt = loraplus.loraplus(optax.sgd, optax.constant_schedule(0.1), ratio=2.0)
    updates, _ = opt.update(
        {"q": {"lora_b": jnp.ones(())}}, opt.init({"q": {"lora_b": jnp.ones(())}})
    )
    np.testing.assert_allclose(updates["q"]["lora_b"], -0.2, rtol=1e-6)


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_adamw_factory_trains():
    _, lora, _, embeds = _lora()
    opt = loraplus.loraplus(lambda lr: optax.adamw(lr, weight_decay=0.0), 1e-3, 16.0,
                            embedding_paths=embeds)  # fmt: skip
    state = opt.init(lora)
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, lora), state, lora)
    # Adam's first step is -lr·sign(g) per leaf: the ratio shows directly.
    np.testing.assert_allclose(
        updates["q"]["lora_b"] / updates["q"]["lora_a"][0, 0], 16.0, rtol=1e-4
    )


def test_ratio_below_one_is_an_error():
    with pytest.raises(ValueError, match=r"`ratio` \(lr_B / lr_A\) must be a number >= 1, got 0.5"):
        loraplus.loraplus(optax.sgd, 0.1, ratio=0.5)
