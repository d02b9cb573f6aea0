"""NNX factored forward: outputs and gradients agree with the merged path for every layer kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import apply

D = 8


class Net(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.compute_dtype = dtype
        self.embed = nnx.Embed(11, D, rngs=rngs)
        self.linear = nnx.Linear(D, D, rngs=rngs)
        self.general = nnx.LinearGeneral(D, (2, 4), rngs=rngs)
        self.einsum = nnx.Einsum("btd,dhk->bthk", (D, 2, 4), (2, 4), rngs=rngs)
        self.conv = nnx.Conv(D, 11, (3,), padding="CIRCULAR", rngs=rngs)
        self.layers = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(2)])

    def __call__(self, ids):
        x = self.embed(ids).astype(self.compute_dtype)
        x = self.linear(x) + self.general(x).reshape(x.shape) + self.einsum(x).reshape(x.shape)
        for layer in self.layers:
            x = x + jnp.tanh(layer(x))
        return self.embed.attend(x).astype(x.dtype) + self.conv(x)


class Stacked(nnx.Module):
    """Layers created with ``nnx.vmap`` and run with ``nnx.scan``: stacked kernels."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return x + jnp.tanh(layer(x))

        return body(x, self.layers)


LAYOUTS = {"general": "ioo", "einsum": "ioo", "conv": "wio", "layers": "sio"}
IDS = jax.random.randint(jax.random.key(3), (2, 5), 0, 11)
XS = jax.random.normal(jax.random.key(3), (2, 5, D))


def setup(cls, dtype=jnp.float32, **config_kwargs):
    graphdef, state = nnx.split(cls(nnx.Rngs(0), dtype) if cls is Net else cls(nnx.Rngs(0)))
    state = jax.tree.map(lambda p: p.astype(dtype), state)
    layouts = {k: v for k, v in LAYOUTS.items() if (cls is Net) == (k != "layers")}
    config = jaxlora.LoraConfig(
        r=3, lora_alpha=6, target_modules=".*", init_lora_weights=False, layouts=layouts,
        **config_kwargs,
    )  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    return graphdef, frozen, lora, config


def loss(graphdef, frozen, config, x, mode):
    def fn(lora):
        y = apply(graphdef, frozen, lora, config, x, mode=mode)
        weights = jax.random.normal(jax.random.key(4), y.shape)
        return jnp.sum(y.astype(jnp.float32) * weights), y

    return jax.grad(fn, has_aux=True)


def assert_close(actual, expected, rel):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b).max() + 1e-6)


@pytest.mark.parametrize(("cls", "x"), [(Net, IDS), (Stacked, XS)], ids=["kinds", "stacked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_factored_matches_merged(cls, x, dtype):
    graphdef, frozen, lora, config = setup(cls, dtype)
    x = x.astype(dtype) if cls is Stacked else x  # Net takes token ids
    g_f, y_f = jax.jit(loss(graphdef, frozen, config, x, "factored"))(lora)
    g_m, y_m = jax.jit(loss(graphdef, frozen, config, x, "merged"))(lora)
    assert y_f.dtype == y_m.dtype == dtype
    assert_close(y_f, y_m, 1e-5 if dtype == jnp.float32 else 3e-2)
    if dtype == jnp.float32:
        assert_close(g_f, g_m, 1e-4)
    else:  # merged rounds W + s·A·B to bfloat16; compare with the same weights in float32
        upcast = jax.tree.map(lambda p: p.astype(jnp.float32), frozen)
        graphdef32, _, _, _ = setup(cls)
        x32 = x if cls is Net else x.astype(jnp.float32)
        g_ref, _ = jax.jit(loss(graphdef32, upcast, config, x32, "merged"))(lora)
        for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_ref), strict=True):
            assert np.linalg.norm(a - b) <= 0.2 * np.linalg.norm(b)  # bf16 backward, tanh layers


@pytest.mark.slow
def test_without_jit():
    graphdef, frozen, lora, config = setup(Net)
    y_f = apply(graphdef, frozen, lora, config, IDS)
    assert_close(y_f, apply(graphdef, frozen, lora, config, IDS, mode="merged"), 1e-5)


@pytest.mark.slow  # 2.5 s in the fast core
def test_graphdef_and_state_are_untouched():
    graphdef, frozen, lora, config = setup(Net)
    before = jax.tree.map(np.asarray, frozen)
    apply(graphdef, frozen, lora, config, IDS, rngs=jax.random.key(0))
    assert_close(frozen, before, 0.0)
    assert isinstance(nnx.merge(graphdef, frozen).linear, nnx.Linear)


@pytest.mark.slow
def test_dropout_mean_and_stacked_keys():
    graphdef, frozen, lora, config = setup(Stacked, lora_dropout=0.2)
    base = apply(graphdef, frozen, lora, config, XS)
    sample = jax.jit(jax.vmap(lambda k: apply(graphdef, frozen, lora, config, XS, rngs=k)))
    samples = np.asarray(sample(jax.random.split(jax.random.key(9), 64)))
    base = np.asarray(base)
    assert np.isfinite(samples).all() and not np.allclose(samples[0], samples[1])
    assert np.abs(samples.mean(0) - base).max() < np.abs(samples - base).max()


@pytest.mark.slow
def test_layers_the_term_does_not_know_run_merged():
    """A grouped Conv and a module reading its own Param get W + s·A·B: speed, not correctness."""

    class Custom(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.linspace(-1.0, 1.0, 16).reshape(4, 4))

        def __call__(self, x):
            return x @ self.kernel[...]

    cases = [
        (nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0)), {".*": "wio"}, (1, 5, 4)),
        (Custom(), {}, (1, 4)),
    ]
    for layer, layouts, shape in cases:
        graphdef, state = nnx.split(nnx.Sequential(layer))
        config = jaxlora.LoraConfig(
            r=2, target_modules=".*", layouts=layouts, init_lora_weights=False
        )
        frozen, lora = jaxlora.split(state, config, jax.random.key(1))
        x = jnp.ones(shape)
        factored = apply(graphdef, frozen, lora, config, x)
        merged = apply(graphdef, frozen, lora, config, x, mode="merged")
        np.testing.assert_allclose(factored, merged, rtol=1e-6, atol=1e-6)
        assert not np.allclose(merged, nnx.merge(graphdef, state)(x))


def test_missing_lora_b_is_an_error():
    config = jaxlora.LoraConfig(r=2, target_modules=".*")
    graphdef, state = nnx.split(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))))
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    del lora["layers"][0]["lora_b"]
    with pytest.raises(ValueError, match="has `lora_a` but no `lora_b` at `layers/0`"):
        apply(graphdef, frozen, lora, config, jnp.ones((1, 4)))
