"""The factored path's guarantee: every adapted weight is used as ``merge`` would use it.

Layers the low-rank term knows run factored; any other read of an adapted weight gets
``W + s·A·B``. These tests hit each way a weight can be read, on linen and NNX.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora

X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
IDS = jnp.array([1, 3])


def _config(**kwargs):
    return jaxlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False, **kwargs)


def _check(model, frozen, lora, config, *inputs, base=None, **kwargs):
    """factored == merged (outputs and every gradient leaf), and != the base model."""

    def loss(theta, mode):
        out = jaxlora.apply(model, frozen, theta, config, *inputs, mode=mode, **kwargs)
        return jnp.sum(jnp.sin(out)), out

    (_, factored), g_factored = jax.value_and_grad(loss, has_aux=True)(lora, "factored")
    (_, merged), g_merged = jax.value_and_grad(loss, has_aux=True)(lora, "merged")
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    for path, gf in jax.tree_util.tree_leaves_with_path(g_factored):
        gm = dict(jax.tree_util.tree_leaves_with_path(g_merged))[path]
        atol = 2e-4 * np.abs(gm).max() + 1e-6  # float32 sums in another order, sin of large
        np.testing.assert_allclose(gf, gm, rtol=0, atol=atol, err_msg=str(path))
        assert np.abs(gf).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    if base is not None:
        assert not np.allclose(merged, base, atol=1e-4), "the adapter did not change the output"


class _Scaled(nn.Embed):
    """Post-processes its parent's output, as Gemma's embedder does."""

    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(float(self.features))


class _Doubled(nn.Dense):
    def __call__(self, x):
        return super().__call__(x) * 2.0


class _RawKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
        return x @ kernel


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, ids):
        embed = _Scaled(7, 5, name="embed")
        h = _Doubled(5, name="doubled")(x) + _RawKernel(name="raw")(x) + embed(ids)
        h = nn.DenseGeneral(5, name="general")(h) + nn.Dense(5, name="dense")(h)
        # A tied head through `attend` and one that reads the table itself.
        return embed.attend(h) + h @ embed.embedding.T


@pytest.mark.slow  # seconds of compiling: full suite only
def test_linen_subclasses_raw_reads_and_tied_tables():
    model = _LinenNet()
    params = model.init(jax.random.key(0), X, IDS)["params"]
    config = _config()
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    base = model.apply({"params": params}, X, IDS)
    _check(model, frozen, lora, config, X, IDS, base=base)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = _NnxScaled(7, 5, rngs=rngs)
        self.dense = nnx.Linear(4, 5, rngs=rngs)
        self.cell = nnx.GRUCell(5, 5, rngs=rngs)

    def __call__(self, x, ids):
        # Attribute reads a model may make of its layers, unchanged by the adapter.
        assert self.dense.kernel.shape == (self.dense.in_features, self.dense.out_features)
        assert self.embed.embedding.shape == (7, 5)
        h = self.dense(x) + self.embed(ids) + x @ self.dense.kernel[...]
        _, h = self.cell(jnp.tanh(h), h)
        return self.embed.attend(h)


class _NnxScaled(nnx.Embed):
    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(float(self.features))


@pytest.mark.slow  # seconds of compiling: full suite only
def test_nnx_subclasses_raw_reads_cells_and_attribute_reads():
    model = _NnxNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    config = _config()
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    assert {"cell", "dense", "embed"} <= set(lora)
    _check(graphdef, frozen, lora, config, X, IDS, base=model(X, IDS))
    # The user's classes are as they were after the call.
    assert nnx.Linear.__call__ is nnx.Linear.__dict__["__call__"]
    assert "jaxlora" not in nnx.Linear.__call__.__module__


@pytest.mark.slow  # 1.6 s in the fast core
def test_boxed_params_linen_and_nnx():
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    model = nn.Dense(5, kernel_init=init)
    params = model.init(jax.random.key(0), X)["params"]
    config = _config()
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    _check(model, frozen, lora, config, X, base=model.apply({"params": params}, X))
    assert isinstance(jaxlora.merge(frozen, lora, config)["kernel"], nn.LogicallyPartitioned)

    with nnx.use_eager_sharding(False):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        layer = nnx.Linear(4, 5, kernel_init=init, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    _check(graphdef, frozen, lora, config, X, base=layer(X))


class _TakesRngs(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 5, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, *, rngs=None, mode="train"):
        scale = 1.0 if mode == "train" else 10.0
        return self.drop(self.dense(x), rngs=rngs, deterministic=rngs is None) * scale


def test_nnx_models_keep_their_rngs_and_keywords():
    model = _TakesRngs(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(r=2, target_modules=["dense"], lora_dropout=0.5)
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    # The model's own dropout draws from the Rngs it is handed; so does LoRA dropout.
    one = jaxlora.apply(graphdef, frozen, lora, config, X, rngs=nnx.Rngs(0, dropout=1))
    two = jaxlora.apply(graphdef, frozen, lora, config, X, rngs=nnx.Rngs(0, dropout=2))
    assert (np.asarray(one) == 0).any() and not np.allclose(one, two)
    plain = jaxlora.apply(graphdef, frozen, lora, config, X)
    np.testing.assert_allclose(plain, model.dense(X), rtol=1e-6)
    # `mode` is jaxlora's own keyword: a model's `mode` goes through `model_kwargs`.
    tenfold = jaxlora.apply(graphdef, frozen, lora, config, X, model_kwargs={"mode": "eval"})
    np.testing.assert_allclose(tenfold, 10 * plain, rtol=1e-6)
    with pytest.raises(ValueError, match="given both directly and in `model_kwargs`"):
        jaxlora.apply(graphdef, frozen, lora, config, X, model_kwargs={"x": 1}, x=2)
    with pytest.raises(TypeError, match="only NNX models take"):
        jaxlora.apply(nn.Dense(5), {}, {}, config, X, rngs=nnx.Rngs(0))


def test_an_adapter_for_another_model_is_an_error_in_both_modes():
    model = nn.Dense(5)
    params = model.init(jax.random.key(0), X)["params"]
    config = _config()
    _, lora = jaxlora.split({"other": params}, config, jax.random.key(1))
    for mode in ("factored", "merged"):
        with pytest.raises(ValueError, match="no counterpart.*another model"):
            jaxlora.apply(model, params, lora, config, X, mode=mode)


class _GemmaQuery(nn.Module):
    """A query projection whose kernel puts the heads first: (heads, d_model, head_dim) = 'oio'."""

    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((2, 4, 3), "bd,ndh->bnh", name="q")(x)
        return q.reshape(q.shape[0], -1)


class _NnxGemmaQuery(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Einsum("bd,ndh->bnh", (2, 4, 3), rngs=rngs)

    def __call__(self, x):
        q = self.q(x)
        return q.reshape(q.shape[0], -1)


@pytest.mark.slow  # seconds of compiling: full suite only
def test_dora_on_kernels_with_output_axes_first():
    config = _config(layouts={"q": "oio"})
    model = _GemmaQuery()
    params = model.init(jax.random.key(0), X)["params"]
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    _check(model, frozen, lora, config, X, base=model.apply({"params": params}, X))
    layer = _NnxGemmaQuery(nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    frozen, lora = jaxlora.split(state, config, jax.random.key(1), variant="dora")
    _check(graphdef, frozen, lora, config, X, base=layer(X))


@pytest.mark.slow  # 1.6 s in the fast core
def test_pissa_on_kernels_with_output_axes_first():
    config = jaxlora.LoraConfig(r=2, target_modules=["q"], layouts={"q": "oio"})
    params = _GemmaQuery().init(jax.random.key(0), X)["params"]
    residual, lora = jaxlora.inits.pissa_split(params, config, jax.random.key(1))
    merged = jaxlora.merge(residual, lora, config)
    np.testing.assert_allclose(merged["q"]["kernel"], params["q"]["kernel"], atol=1e-5)
    assert not np.allclose(residual["q"]["kernel"], params["q"]["kernel"], atol=1e-3)
