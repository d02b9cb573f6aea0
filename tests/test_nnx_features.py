"""NNX as an equal of linen: counts on a full ``nnx.State``, state a training step updates
(``mutable=``), quantised bases on the factored path, ``remat=`` and DoRA, each checked against
the linen model of the same shape where one exists."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import quant
from tests.treeutil import assert_trees_close

X = jax.random.normal(jax.random.key(0), (6, 4))


class NnxNet(nnx.Module):
    """Linear -> BatchNorm -> Dropout -> Linear, with the model's own dropout stream."""

    def __init__(self, rngs, rate=0.5):
        self.fc = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(8, name="fc")(x))
        h = nn.Dropout(0.5, deterministic=not train, name="drop")(h)
        return nn.Dense(3, name="out")(h)


def _nnx(rate=0.5):
    return nnx.split(NnxNet(nnx.Rngs(0, dropout=1), rate))


# --- count and split on a full nnx.State -------------------------------------------------------


@pytest.mark.slow  # seconds of compiling: full suite only
def test_count_of_a_full_state_is_the_linen_params_count():
    config = jaxlora.LoraConfig(r=2, target_modules=["fc", "out"], bias="all")
    _, state = _nnx()
    variables = LinenNet().init(jax.random.key(0), X, False)
    assert set(variables) == {"params", "batch_stats"}
    linen_count = jaxlora.count(*jaxlora.split(variables["params"], config, jax.random.key(1)))
    nnx_count = jaxlora.count(*jaxlora.split(state, config, jax.random.key(1)))
    assert nnx_count == linen_count
    base = (4 * 8 + 8) + 2 * 8 + (8 * 3 + 3)  # fc, bn scale and bias, out: no mean / var / rngs
    factors = (4 * 2 + 2 * 8) + (8 * 2 + 2 * 3)
    assert (nnx_count.total, nnx_count.trainable) == (base + factors, factors + 8 + 8 + 3)
    params_only = nnx.split(NnxNet(nnx.Rngs(0, dropout=1)), nnx.Param, ...)[1]
    assert jaxlora.count(state) == jaxlora.count(params_only) == jaxlora.count(variables["params"])


def test_count_and_split_of_an_abstract_full_state():
    config = jaxlora.LoraConfig(r=2, target_modules=["fc", "out"])
    abstract = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0, dropout=1)))
    _, shapes = nnx.split(abstract)
    assert any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    frozen, lora = jax.eval_shape(lambda s: jaxlora.split(s, config, jax.random.key(1)), shapes)
    _, state = _nnx()
    concrete = jaxlora.split(state, config, jax.random.key(1))
    assert jaxlora.count(frozen, lora) == jaxlora.count(*concrete)


def test_split_never_trains_batch_stats_or_rng_state():
    """``modules_to_save`` over modules holding BatchStat / RNG variables copies their Params
    only; a non-Param variable named ``kernel`` is no LoRA target."""

    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)
            self.fc.kernel_stats = nnx.BatchStat(jnp.zeros((4, 4)))
            self.stat = nnx.Module()
            self.stat.kernel = nnx.BatchStat(jnp.zeros((4, 4)))

    _, state = _nnx()
    config = jaxlora.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["bn", "drop"])
    with pytest.raises(ValueError, match=r"`modules_to_save` entries \['drop'\] match no module"):
        jaxlora.split(state, config, jax.random.key(1))
    config = jaxlora.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["bn"])
    _, lora = jaxlora.split(state, config, jax.random.key(1))
    assert jax.tree.map(jnp.shape, lora) == {
        "fc": {"lora_a": (4, 2), "lora_b": (2, 8)},
        "bn": {"bias": (8,), "scale": (8,)},
    }
    _, odd = nnx.split(Odd(nnx.Rngs(0)))
    _, lora = jaxlora.split(odd, jaxlora.LoraConfig(r=2, target_modules=".*"), jax.random.key(1))
    assert list(lora) == ["fc"]


# --- mutable state through a training step -----------------------------------------------------


def _train(steps, fold_back, lora_dropout=0.0, lora_keys=True):
    """Jitted SGD steps on LoRA; returns per-step outputs (computed with the step's state) and the
    final frozen state, lora and updates."""
    graphdef, state = _nnx()
    config = jaxlora.LoraConfig(r=2, target_modules=["fc", "out"], lora_dropout=lora_dropout,
                                init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))

    @jax.jit
    def step(lora, frozen, key):
        def loss(lora):
            y, updates = jaxlora.apply(graphdef, frozen, lora, config, X, rngs=key, mutable=True)
            return jnp.mean(y**2), (y, updates)

        (_, (y, updates)), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        return jax.tree.map(lambda p, g: p - 0.1 * g, lora, grads), y, updates, grads

    outs, stats, history = [], [], []
    for i in range(steps):
        key = jax.random.fold_in(jax.random.key(7), i if lora_keys else 0)
        lora, y, updates, grads = step(lora, frozen, key)
        assert jax.tree.structure(grads) == jax.tree.structure(lora)
        if fold_back:
            frozen = nnx.merge_state(frozen, updates)
        outs.append(np.asarray(y))
        stats.append(np.asarray(frozen["bn"]["mean"][...]))
        history.append(updates)
    return outs, stats, frozen, state, history


@pytest.mark.slow  # seconds of compiling: full suite only
def test_mutable_updates_carry_batch_stats_and_rng_counters_between_steps():
    outs, stats, frozen, state, history = _train(3, fold_back=True)
    updates = history[-1]
    assert not jax.tree.leaves(nnx.filter_state(updates, nnx.Param))
    assert sorted(updates) == ["bn", "drop"]
    assert [int(u["drop"]["rngs"]["count"][...]) for u in history] == [1, 2, 3]
    assert not np.allclose(stats[0], stats[1]) and not np.allclose(stats[1], stats[2])
    # The base parameters never move; the batch statistics are the running averages.
    assert_trees_close(nnx.filter_state(frozen, nnx.Param), nnx.filter_state(state, nnx.Param))
    h = X @ state["fc"]["kernel"][...]  # B = init: the fc adapter adds s·(x·A)·B, not zero
    assert np.abs(stats[0]).max() > 0 and not np.allclose(stats[0], 0.1 * np.asarray(h.mean(0)))


@pytest.mark.slow  # seconds of compiling: full suite only
def test_model_dropout_masks_change_only_when_updates_are_folded_back():
    def masks(fold_back):
        graphdef, state = _nnx(rate=0.5)
        config = jaxlora.LoraConfig(r=2, target_modules=["fc"])  # B = 0: the base model's output
        frozen, lora = jaxlora.split(state, config, jax.random.key(1))
        hidden = lambda m, x: m.drop(m.bn(m.fc(x)))  # noqa: E731  (the dropout layer's output)
        step = jax.jit(
            lambda frozen: jaxlora.apply(
                graphdef, frozen, lora, config, X, method=hidden, mutable=[nnx.RngState]
            )
        )
        zeros = []
        for _ in range(3):
            h, updates = step(frozen)
            assert sorted(updates) == ["drop"]
            if fold_back:
                frozen = nnx.merge_state(frozen, updates)
            zeros.append(np.asarray(h) == 0)
        return zeros

    folded, kept = masks(True), masks(False)
    assert all((m.any() and not m.all()) for m in folded)  # dropout zeroes some units
    assert not np.array_equal(folded[0], folded[1]) and not np.array_equal(folded[1], folded[2])
    assert np.array_equal(kept[0], kept[1]) and np.array_equal(kept[1], kept[2])


@pytest.mark.slow  # seconds of compiling: full suite only
def test_lora_dropout_masks_change_with_the_step_key():
    """LoRA dropout draws from the key given to each step (``fold_in(key, step)``): a new mask
    per key, the same mask for the same key, inside the same ``mutable=True`` call."""
    first, second = _lora_terms(0.5)
    assert not np.allclose(first, second)
    again = _lora_terms(0.5, same=True)
    np.testing.assert_array_equal(again[0], again[1])
    no_dropout = _lora_terms(0.0)
    np.testing.assert_allclose(no_dropout[0], no_dropout[1], rtol=1e-6)
    assert np.abs(no_dropout[0]).max() > 0


def _lora_terms(rate, same=False):
    """The LoRA term's output (factored minus base, model dropout off) for two step keys."""
    graphdef, state = _nnx(rate=0.0)
    config = jaxlora.LoraConfig(r=2, target_modules=["fc"], lora_dropout=rate,
                                init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    base = nnx.merge(graphdef, state)(X)
    keys = [jax.random.key(3), jax.random.key(3 if same else 4)]
    return [np.asarray(jaxlora.apply(graphdef, frozen, lora, config, X, rngs=k, mutable=True)[0]
                       - base) for k in keys]  # fmt: skip


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.slow  # seconds of compiling: full suite only
def test_linen_mutable_passes_through_to_flax(mode):
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, False)
    config = jaxlora.LoraConfig(r=2, target_modules=["fc", "out"], init_lora_weights=False)
    frozen, lora = jaxlora.split(variables["params"], config, jax.random.key(1))
    rngs = {"dropout": jax.random.key(2)}
    others = {"batch_stats": variables["batch_stats"]}
    expected = model.apply({**others, "params": jaxlora.merge(frozen, lora, config)}, X,
                           rngs=rngs, mutable=["batch_stats"])  # fmt: skip
    for mutable in (["batch_stats"], True):
        out = jaxlora.apply(model, frozen, lora, config, X, mode=mode, rngs=rngs,
                            variables=others, mutable=mutable, lora_deterministic=True)  # fmt: skip
        assert set(out[1]) == {"batch_stats"}
        assert_trees_close(out, expected, rtol=1e-5, atol=1e-6)
    plain = jaxlora.apply(model, frozen, lora, config, X, False, variables=others, mode=mode)
    assert isinstance(plain, jax.Array)  # default: the output alone
    with pytest.raises(ValueError, match="`mutable` names the `params` collection"):
        jaxlora.apply(model, frozen, lora, config, X, variables=others, mutable=["params"])
    with pytest.raises(TypeError, match="`mutable` on a linen model must be True"):
        jaxlora.apply(model, frozen, lora, config, X, variables=others, mutable=3)


def test_nnx_mutable_names_and_errors():
    graphdef, state = _nnx()
    config = jaxlora.LoraConfig(r=2, target_modules=["fc"])
    frozen, lora = jaxlora.split(state, config, jax.random.key(1))
    _, stats = jaxlora.apply(graphdef, frozen, lora, config, X, mutable=["batch_stats"])
    assert sorted(stats["bn"]) == ["mean", "var"] and "drop" not in stats
    with pytest.raises(ValueError, match=r"`mutable` names the params \(`nnx.Param`\)"):
        jaxlora.apply(graphdef, frozen, lora, config, X, mutable=nnx.Param)  # as linen's "params"
    assert isinstance(jaxlora.apply(graphdef, frozen, lora, config, X), jax.Array)
    with pytest.raises(TypeError, match="`mutable` on an NNX model must be True or an NNX filter"):
        jaxlora.apply(graphdef, frozen, lora, config, X, mutable=3.5)


# --- quantised bases on the NNX factored path --------------------------------------------------


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


class LinenMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="down")(nn.relu(nn.Dense(32, name="up")(x)))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("method", ["int8", "nf4", "q4_1"])
@pytest.mark.slow
def test_quantised_base_factored_equals_merged_on_the_dequantised_base(method, framework):
    x = jax.random.normal(jax.random.key(5), (4, 16))
    if framework == "nnx":
        model, params = nnx.split(NnxMlp(nnx.Rngs(0)))
    else:
        model = LinenMlp()
        params = model.init(jax.random.key(0), x)["params"]
    targets = (
        ["up"] if method == "int8" else ["up", "down"]
    )  # int8: `down` stays quantised, no LoRA
    config = jaxlora.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    qparams = quant.quantize(params, ["up", "down"], method, block_size=32)
    frozen, lora = quant.split_quantized(qparams, config, jax.random.key(1))
    base = quant.dequantize_tree(qparams)

    def loss(lora, frozen, mode):
        return jnp.sum(jaxlora.apply(model, frozen, lora, config, x, mode=mode) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    value, grads = value_and_grad(lora, frozen, "factored")
    expected = value_and_grad(lora, base, "merged")
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert_trees_close(grads, expected[1], rtol=1e-4, atol=1e-5)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    if framework == "nnx":  # and the merged mode on the quantised base itself
        merged = value_and_grad(lora, frozen, "merged")
        np.testing.assert_allclose(merged[0], expected[0], rtol=1e-5)


# --- DoRA, merged and factored, on both frameworks ---------------------------------------------


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.slow
def test_dora_factored_equals_merged(framework):
    x = jax.random.normal(jax.random.key(5), (4, 16))
    if framework == "nnx":
        model, params = nnx.split(NnxMlp(nnx.Rngs(0)))
    else:
        model = LinenMlp()
        params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"],
                                init_lora_weights=False)  # fmt: skip
    frozen, lora = jaxlora.split(params, config, jax.random.key(1), variant="dora")
    lora = jax.tree.map(lambda p: p * 1.1, lora)  # magnitudes off their initial norms too

    def loss(lora, mode):
        return jnp.sum(jaxlora.apply(model, frozen, lora, config, x, mode=mode) ** 2)

    factored = jax.jit(jax.value_and_grad(loss), static_argnums=1)(lora, "factored")
    merged = jax.value_and_grad(loss)(lora, "merged")
    np.testing.assert_allclose(factored[0], merged[0], rtol=1e-5)
    assert_trees_close(factored[1], merged[1], rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(factored[1]["up"]["lora_magnitude"]).sum()) > 0


@pytest.mark.slow
def test_nnx_quantised_factored_keeps_no_float_copy_of_every_kernel_alive():
    """XLA:CPU would dequantise every kernel up front and keep all copies for the backward pass;
    like the linen path, the NNX one keeps only the codes (the base is a jit argument)."""

    class Chain(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List(
                [nnx.Linear(512, 512, use_bias=False, rngs=rngs) for _ in range(6)]
            )

        def __call__(self, h):
            for layer in self.layers:
                h = jnp.tanh(layer(h))
            return h

    graphdef, state = nnx.split(Chain(nnx.Rngs(0)))
    config = jaxlora.LoraConfig(r=4, target_modules=r"layers/[0-3]")  # 4, 5: quantised, no LoRA
    frozen, lora = quant.split_quantized(quant.quantize(state, ".*", "nf4"), config,
                                         jax.random.key(1))  # fmt: skip
    x = jnp.ones((4, 512))
    grad = jax.grad(lambda lora, frozen: jnp.sum(jaxlora.apply(graphdef, frozen, lora, config, x)))
    temp = jax.jit(grad).lower(lora, frozen).compile().memory_analysis().temp_size_in_bytes
    assert temp < 6 * 512 * 512 * 4 / 2
