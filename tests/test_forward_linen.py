"""Linen factored forward: outputs and gradients agree with the merged path for every layer kind."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import lora_interceptor

D = 8


class DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="proj")(nn.tanh(nn.Dense(D, name="fc")(x)))


class AttentionNet(nn.Module):
    """linen attention: DenseGeneral q/k/v ('ioo') and out ('iio'), plus batch_dims."""

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x)
        return nn.DenseGeneral(4, axis=-1, batch_dims=(0,), name="per_row")(x)


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((D, 2, 3), "btd,dhk->bthk", name="heads")(x)
        return nn.Einsum((2, 3, D), "bthk,hkd->btd", name="merge")(h)


class EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, D, name="embed")
        return embed.attend(nn.Dense(D, name="mix")(embed(ids)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(5, (3, 3), strides=2, padding="SAME", name="conv1")(x)
        return nn.Conv(4, (2, 2), padding="CIRCULAR", kernel_dilation=2, name="conv2")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D, name="fc")(nn.Dropout(0.0, deterministic=True)(x)), None


class ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=3,
        )
        return stack(name="layers")(x, None)[0]


def _inputs(kind, dtype):
    key = jax.random.key(3)
    if kind == "embed":
        return jax.random.randint(key, (2, 5), 0, 11)
    if kind == "conv":
        return jax.random.normal(key, (2, 6, 6, 3), dtype)
    return jax.random.normal(key, (2, 5, D), dtype)


MODELS = {
    "dense": DenseNet(),
    "attention": AttentionNet(),
    "einsum": EinsumNet(),
    "embed": EmbedNet(),
    "conv": ConvNet(),
    "scan": ScanNet(),
}


def setup(kind, dtype=jnp.float32, **config_kwargs):
    model, x = MODELS[kind], _inputs(kind, dtype)
    params = model.init(jax.random.key(0), _inputs(kind, jnp.float32))["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    config_kwargs.setdefault("target_modules", ".*")
    config = jaxlora.LoraConfig(
        r=3,
        lora_alpha=6,
        init_lora_weights=False,
        layouts=jaxlora.infer_layouts(model, _inputs(kind, jnp.float32)),
        **config_kwargs,
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    return model, x, frozen, lora, config


def factored_apply(model, frozen, lora, config, x, rngs=None, deterministic=True):
    with nn.intercept_methods(lora_interceptor(config, deterministic)):
        return model.apply({"params": jaxlora.adapted_params(frozen, lora, config)}, x, rngs=rngs)


def merged_apply(model, frozen, lora, config, x):
    return model.apply({"params": jaxlora.merge(frozen, lora, config)}, x)


def loss(apply_fn, model, frozen, config, x):
    """A loss linear in the output, so rounding differences stay rounding-sized in the gradient."""

    def fn(lora):
        y = apply_fn(model, frozen, lora, config, x)
        weights = jax.random.normal(jax.random.key(4), y.shape)
        return jnp.sum(y.astype(jnp.float32) * weights), y

    return fn


def assert_close(actual, expected, rel):
    """Leaf-wise |actual - expected| <= rel * max|expected| (plus a tiny floor)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            a, b, rtol=0, atol=rel * np.abs(b).max() + 1e-6, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_factored_matches_merged(kind, dtype):
    model, x, frozen, lora, config = setup(kind, dtype)
    factored = jax.jit(jax.grad(loss(factored_apply, model, frozen, config, x), has_aux=True))
    merged = jax.jit(jax.grad(loss(merged_apply, model, frozen, config, x), has_aux=True))
    (g_f, y_f), (g_m, y_m) = factored(lora), merged(lora)
    assert y_f.dtype == y_m.dtype == dtype
    assert_close(y_f, y_m, 1e-5 if dtype == jnp.float32 else 3e-2)
    assert_close(g_f, g_m, 1e-4 if dtype == jnp.float32 else 1e-1)


# Without jit (op by op, slow on CPU): outputs for every kind, gradients for the cheap ones.
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.slow
def test_factored_matches_merged_without_jit(kind):
    model, x, frozen, lora, config = setup(kind)
    y_f = factored_apply(model, frozen, lora, config, x)
    assert_close(y_f, merged_apply(model, frozen, lora, config, x), 1e-5)
    if kind in ("dense", "embed"):
        g_f = jax.grad(loss(factored_apply, model, frozen, config, x), has_aux=True)(lora)[0]
        g_m = jax.grad(loss(merged_apply, model, frozen, config, x), has_aux=True)(lora)[0]
        assert_close(g_f, g_m, 1e-4)


@pytest.mark.parametrize("kind", ["dense", "scan", "embed"])
@pytest.mark.slow
def test_fresh_adapter_is_the_base_model(kind):
    model, x, frozen, _, config = setup(kind)
    config = jaxlora.LoraConfig(**{**config.to_dict(), "init_lora_weights": True})
    _, lora = jaxlora.split(frozen, config, jax.random.key(1))
    y = factored_apply(model, frozen, lora, config, x)
    np.testing.assert_array_equal(y, model.apply({"params": frozen}, x))


@pytest.mark.slow
def test_only_adapted_layers_change():
    model, x, frozen, lora, config = setup("dense", target_modules=["proj"])
    assert set(lora) == {"proj"}
    y_f = factored_apply(model, frozen, lora, config, x)
    np.testing.assert_allclose(y_f, merged_apply(model, frozen, lora, config, x), atol=1e-5)


@pytest.mark.slow
def test_dropout_zero_is_exact():
    model, x, frozen, lora, config = setup("scan")
    plain = factored_apply(model, frozen, lora, config, x)
    rngs = {"dropout": jax.random.key(5)}
    np.testing.assert_array_equal(
        factored_apply(model, frozen, lora, config, x, rngs, deterministic=False), plain
    )
    dropped = jaxlora.LoraConfig(**{**config.to_dict(), "lora_dropout": 0.3})
    np.testing.assert_array_equal(factored_apply(model, frozen, lora, dropped, x, rngs), plain)


@pytest.mark.slow
def test_dropout_mean_over_keys_matches():
    model, x = nn.Dense(6), jnp.ones((2, 4))
    config = jaxlora.LoraConfig(r=3, target_modules=".*", init_lora_weights=False, lora_dropout=0.2)
    frozen, lora = jaxlora.split(
        model.init(jax.random.key(0), x)["params"], config, jax.random.key(1)
    )
    base = factored_apply(model, frozen, lora, config, x)
    term = base - model.apply({"params": frozen}, x)

    def sample(key):
        return factored_apply(model, frozen, lora, config, x, {"dropout": key}, False)

    samples = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(9), 512))
    assert not np.allclose(samples[0], samples[1])
    # The layer is linear in the LoRA input and E[dropout(x)] = x: the mean is the plain output.
    np.testing.assert_allclose(samples.mean(0), base, atol=0.1 * np.abs(term).max())


@pytest.mark.slow
def test_dropout_in_a_scan():
    model, x, frozen, lora, config = setup("scan", lora_dropout=0.5)
    out = jax.jit(lambda k: factored_apply(model, frozen, lora, config, x, {"dropout": k}, False))
    a, b = out(jax.random.key(1)), out(jax.random.key(2))
    assert np.isfinite(a).all() and not np.allclose(a, b)
    np.testing.assert_array_equal(out(jax.random.key(1)), a)


def test_dropout_needs_an_rng():
    model, x, frozen, lora, config = setup("dense", lora_dropout=0.1)
    with pytest.raises(ValueError, match="has no `dropout` rng"):
        factored_apply(model, frozen, lora, config, x, deterministic=False)


def test_interceptor_needs_a_config():
    with pytest.raises(TypeError, match="`config` must be a jaxlora.LoraConfig"):
        lora_interceptor({"r": 8})


def test_an_adapted_weight_without_its_config_says_where():
    from jaxlora._src.forward.adapted import AdaptedWeight

    weight = AdaptedWeight(jnp.ones((2, 3)), {}, names=("layer", "fc", "kernel"))
    with pytest.raises(TypeError, match="at `layer/fc` was made without its LoraConfig"):
        weight.lora_config  # noqa: B018


def test_missing_lora_b_is_an_error():
    model, x, frozen, lora, config = setup("dense")
    del lora["fc"]["lora_b"]
    with pytest.raises(ValueError, match="has `lora_a` but no `lora_b` at `fc`"):
        factored_apply(model, frozen, lora, config, x)


def test_a_combine_tree_under_the_interceptor_is_an_error():
    model, x, frozen, lora, config = setup("dense")
    with nn.intercept_methods(lora_interceptor(config)):
        with pytest.raises(ValueError, match="hold raw LoRA factors.*adapted_params"):
            model.apply({"params": jaxlora.combine(frozen, lora)}, x)


@pytest.mark.slow
def test_factors_that_do_not_fit_the_layer():
    model, x, frozen, _, config = setup("attention", target_modules=["query"])
    wrong = jaxlora.LoraConfig(**{**config.to_dict(), "layouts": {"query": "iio"}})
    _, lora = jaxlora.split(frozen, wrong, jax.random.key(1))
    with pytest.raises(ValueError, match=r"factors at `attn/query` do not fit the layer.*'ioo'"):
        factored_apply(model, frozen, lora, wrong, x)


@pytest.mark.slow
def test_einsum_with_unordered_kernel_axes():
    model = nn.Einsum((2, 3, D), "btd,hkd->bthk", name="heads")
    x = _inputs("einsum", jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=".*", layouts={".*": "ioo"})
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match="cannot split the Einsum kernel.*'ooi'"):
        factored_apply(model, frozen, lora, config, x)


@pytest.mark.slow
def test_grouped_conv_runs_on_its_merged_kernel():
    """A grouped Conv is not one the low-rank term knows: it costs speed, not correctness."""
    model = nn.Conv(4, (3, 3), feature_group_count=2)
    x = jnp.ones((1, 5, 5, 4))
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(
        r=2, target_modules=".*", layouts={".*": "wwio"}, init_lora_weights=False
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    factored = factored_apply(model, frozen, lora, config, x)
    merged = merged_apply(model, frozen, lora, config, x)
    np.testing.assert_allclose(factored, merged, rtol=1e-6, atol=1e-6)
    assert not np.allclose(merged, model.apply({"params": params}, x))


# The Dense fast path: fused.dense replaces layer + term, with the same results.
def _dense_reference(x, kernel, bias, a, b, scale):
    y = x @ kernel + scale * ((x @ a) @ b)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.slow
def test_dense_fused_matches_autodiff(use_bias, dtype, use_jit):
    from jaxlora._src.forward import fused as fused_lib

    keys = jax.random.split(jax.random.key(7), 6)
    x = jax.random.normal(keys[0], (2, 5, 6), dtype)
    kernel = jax.random.normal(keys[1], (6, 4), dtype)
    bias = jax.random.normal(keys[2], (4,), dtype) if use_bias else None
    a, b = jax.random.normal(keys[3], (6, 3), dtype), jax.random.normal(keys[4], (3, 4), dtype)
    weights = jax.random.normal(keys[5], (2, 5, 4), jnp.float32)

    def loss(fn):
        def run(*args):
            return jnp.sum(fn(*args, 0.5).astype(jnp.float32) * weights)

        grad = jax.grad(run, argnums=(0, 1, 2, 3, 4))
        return jax.jit(grad) if use_jit else grad

    def fused(x, k, bias, a, b, s):
        return fused_lib.dense(x, k, bias, a, b, None, s, 0.0, None)

    got = loss(fused)(x, kernel, bias, a, b)
    want = loss(_dense_reference)(x, kernel, bias, a, b)
    assert_close(got, want, 1e-5 if dtype == jnp.float32 else 3e-2)
    y = fused(x, kernel, bias, a, b, 0.5)
    assert y.dtype == dtype
    assert_close(
        y, _dense_reference(x, kernel, bias, a, b, 0.5), 1e-5 if dtype == jnp.float32 else 3e-2
    )


def _general_path(apply_fn):
    """``apply_fn`` with the fast path switched off: layer call plus separate low-rank term."""
    from jaxlora._src.forward import fused

    def run(*args):
        with fused.disabled():
            return apply_fn(*args)

    return run


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.slow
def test_dense_fast_path_matches_general_path_and_merged(dtype):
    model, x, frozen, _, config = setup("dense", dtype)
    # Factors in the layer's dtype (the default is float32), so bfloat16 takes the fast path too.
    config = jaxlora.LoraConfig(**{**config.to_dict(), "dtype": jnp.dtype(dtype).name})
    _, lora = jaxlora.split(frozen, config, jax.random.key(1))
    results = [
        jax.jit(jax.grad(loss(apply_fn, model, frozen, config, x), has_aux=True))(lora)
        for apply_fn in [factored_apply, _general_path(factored_apply), merged_apply]
    ]
    (g_fast, y_fast), *others = results
    for g, y in others:
        assert y_fast.dtype == y.dtype == dtype
        assert_close(y_fast, y, 1e-5 if dtype == jnp.float32 else 3e-2)
        assert_close(g_fast, g, 1e-4 if dtype == jnp.float32 else 1e-1)
