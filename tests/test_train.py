"""Training on the merged path: the loss falls, the base never moves, optimizer state is |Θ|."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import LoraConfig, infer_layouts
from tests import linen_models as lm
from tests.treeutil import assert_trees_bitwise_equal

STEPS = 50


def size(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def setup(scan=False):
    model = lm.Decoder(scan=scan)
    ids = jax.random.randint(jax.random.key(1), (4, lm.SEQ + 1), 0, lm.VOCAB)
    params = lm.init(model, ids[:, :-1])
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "fc1"],
        layouts=infer_layouts(model, ids[:, :-1]),
    )
    return model, params, config, ids


def next_token_loss(model, params, ids):
    logits = model.apply({"params": params}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


@pytest.mark.standard_dtypes
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_lora_training_lowers_loss_and_freezes_base(scan):
    model, params, config, ids = setup(scan)
    base_copy = jax.tree.map(np.array, params)
    frozen, lora = jaxlora.split(params, config, jax.random.key(2))
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(lora)

    def loss(lora, frozen, ids):
        return next_token_loss(model, jaxlora.merge(frozen, lora, config), ids)

    @jax.jit
    def step(lora, opt_state, frozen, ids):
        value, grads = jax.value_and_grad(loss)(lora, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    losses = []
    for _ in range(STEPS):
        lora, opt_state, value = step(lora, opt_state, frozen, ids)
        losses.append(float(value))
    assert losses[-1] < 0.7 * losses[0]
    assert_trees_bitwise_equal(frozen, base_copy)
    adam_state = opt_state[0]
    assert size(adam_state.mu) == size(adam_state.nu) == size(lora)
    assert size(lora) == jaxlora.count(frozen, lora).trainable


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_combined_tree_with_freeze_moves_only_theta():
    model, params, config, ids = setup()
    frozen, lora = jaxlora.split(params, config, jax.random.key(2))
    combined = jaxlora.combine(frozen, lora)
    optimizer = jaxlora.freeze(optax.adam(1e-2), config)
    opt_state = optimizer.init(combined)

    def loss(combined, ids):
        frozen, lora = jaxlora.partition(combined, config)
        return next_token_loss(model, jaxlora.merge(frozen, lora, config), ids)

    @jax.jit
    def step(combined, opt_state, ids):
        value, grads = jax.value_and_grad(loss)(combined, ids)
        updates, opt_state = optimizer.update(grads, opt_state, combined)
        return optax.apply_updates(combined, updates), opt_state, value

    first = None
    for _ in range(STEPS):
        combined, opt_state, value = step(combined, opt_state, ids)
        first = float(value) if first is None else first
    assert float(value) < 0.7 * first
    trained_frozen, trained_lora = jaxlora.partition(combined, config)
    assert_trees_bitwise_equal(trained_frozen, params)
    mask = jaxlora.trainable_mask(combined, config)
    assert sum(jax.tree.leaves(mask)) == len(jax.tree.leaves(lora))
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * size(lora)
    assert not np.allclose(trained_lora["layer_0"]["fc1"]["lora_b"], 0)


@pytest.mark.slow
def test_gradient_flows_only_to_theta():
    model, params, config, ids = setup()
    frozen, lora = jaxlora.split(params, config, jax.random.key(2))
    grads = jax.jit(
        jax.grad(lambda lora: next_token_loss(model, jaxlora.merge(frozen, lora, config), ids))
    )(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    # B starts at zero, so only B has a gradient at the first step (dL/dA = s * dW B^T = 0).
    assert np.abs(grads["layer_0"]["fc1"]["lora_b"]).max() > 0
    assert not np.abs(grads["layer_0"]["fc1"]["lora_a"]).max()
    assert jnp.dtype(grads["layer_0"]["fc1"]["lora_b"].dtype) == jnp.float32
