"""``jaxlora.apply``: one entry point, two modes, dropout rules, trainable copies, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import apply


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8, name="fc")(x)))
        return nn.Dense(3, name="head")(h)


X = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)


def setup(**config_kwargs):
    model = Net()
    params = model.init(jax.random.key(0), X)["params"]
    config_kwargs.setdefault("target_modules", ["fc"])
    config = jaxlora.LoraConfig(r=2, init_lora_weights=False, **config_kwargs)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    return model, frozen, lora, config


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.slow
def test_modes_agree(use_jit):
    model, frozen, lora, config = setup()

    def run(lora, mode):
        return apply(model, frozen, lora, config, X, mode=mode)

    run = jax.jit(run, static_argnames="mode") if use_jit else run
    np.testing.assert_allclose(run(lora, "factored"), run(lora, "merged"), atol=1e-5)


@pytest.mark.slow
def test_config_can_be_a_jit_argument():
    model, frozen, lora, config = setup()
    step = jax.jit(lambda lo, cfg: apply(model, frozen, lo, cfg, X))
    np.testing.assert_allclose(step(lora, config), apply(model, frozen, lora, config, X))


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.slow
def test_trainable_copies_take_effect(mode):
    model, frozen, lora, config = setup(bias="all", modules_to_save=["head"])
    assert set(lora["head"]) == {"kernel", "bias"} and "bias" in lora["fc"]
    changed = jax.tree.map(lambda v: v, lora)
    changed["head"]["bias"] = lora["head"]["bias"] + 1.0
    delta = apply(model, frozen, changed, config, X, mode=mode) - apply(
        model, frozen, lora, config, X, mode=mode
    )
    np.testing.assert_allclose(delta, jnp.ones_like(delta), atol=1e-5)
    grads = jax.grad(lambda lo: apply(model, frozen, lo, config, X, mode=mode).sum())(lora)
    assert float(jnp.abs(grads["fc"]["bias"]).sum()) > 0
    np.testing.assert_allclose(grads["head"]["bias"], jnp.full((3,), 3.0))


def test_model_dropout_and_lora_dropout_share_the_dropout_stream():
    model, frozen, lora, config = setup(lora_dropout=0.5)
    key = jax.random.key(3)
    y1 = apply(model, frozen, lora, config, X, rngs={"dropout": key}, train=True)
    y2 = apply(model, frozen, lora, config, X, rngs=key, train=True)  # a bare key is "dropout"
    np.testing.assert_array_equal(y1, y2)
    y_eval = apply(model, frozen, lora, config, X, rngs=key, lora_deterministic=True, train=True)
    plain = apply(model, frozen, lora, config, X, rngs=key, train=True, mode="factored",
                  lora_deterministic=True)  # fmt: skip
    np.testing.assert_array_equal(y_eval, plain)
    assert not np.allclose(y1, y_eval)


def test_dropout_is_off_without_an_rng():
    model, frozen, lora, config = setup(lora_dropout=0.5)
    no_dropout = jaxlora.LoraConfig(**{**config.to_dict(), "lora_dropout": 0.0})
    np.testing.assert_array_equal(
        apply(model, frozen, lora, config, X), apply(model, frozen, lora, no_dropout, X)
    )
    # Evaluation in merged mode is allowed even with lora_dropout set.
    merged = apply(model, frozen, lora, config, X, mode="merged", lora_deterministic=True)
    np.testing.assert_allclose(merged, apply(model, frozen, lora, config, X), atol=1e-5)


def test_nnx_model_or_graphdef():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    y_g = apply(graphdef, frozen, lora, config, X)
    y_m = apply(model, frozen, lora, config, X, mode="merged")
    np.testing.assert_allclose(y_g, y_m, atol=1e-5)
    y_method = apply(graphdef, frozen, lora, config, X, method=lambda m, x: m(x) * 2)
    np.testing.assert_allclose(y_method, 2 * y_g, atol=1e-5)


def test_errors():
    model, frozen, lora, config = setup(lora_dropout=0.1)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        apply(model, frozen, lora, config, X, mode="fast")
    with pytest.raises(ValueError, match="`mode='merged'` cannot apply LoRA dropout"):
        apply(model, frozen, lora, config, X, mode="merged", rngs={"dropout": key})
    with pytest.raises(
        ValueError, match="`lora_deterministic=False` with `lora_dropout`=0.1 needs"
    ):
        apply(model, frozen, lora, config, X, lora_deterministic=False, rngs={"params": key})
    with pytest.raises(TypeError, match="`rngs` must be a dict of PRNG keys"):
        apply(model, frozen, lora, config, X, rngs=[key])
    with pytest.raises(TypeError, match="`config` must be a jaxlora.LoraConfig"):
        apply(model, frozen, lora, config.to_dict(), X)
    with pytest.raises(TypeError, match="`model` must be a flax.linen Module"):
        apply(lambda x: x, frozen, lora, config, X)
    nnx_model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    state = nnx.state(nnx_model)
    with pytest.raises(ValueError, match="`variables` is for linen models"):
        apply(nnx_model, state, {}, config, X, variables={"batch_stats": {}})


def test_model_deterministic_argument_passes_through():
    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            x = nn.Dense(8, name="dense")(x)
            return nn.Dropout(0.5)(x, deterministic=deterministic)

    model = WithDropout()
    x = jnp.ones((4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=["dense"])
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    rngs = {"dropout": jax.random.key(2)}
    train = jaxlora.apply(model, frozen, lora, config, x, rngs=rngs, deterministic=False)
    evaluation = jaxlora.apply(model, frozen, lora, config, x, rngs=rngs, deterministic=True)
    assert bool((train == 0).any()) and not bool((evaluation == 0).any())
