"""``jaxlora.factored`` on Equinox, proven as on Flax: a recurrent cell, dropout, quantised bases.

The model is ``tests/equinox_models.GRU``, a GRU-style cell of ``eqx.nn.Linear`` layers run over a
sequence by ``lax.scan``: the same adapted weights at every step, the carry flowing through. On it,
under ``eqx.filter_jit`` / ``jax.jit`` and ``eqx.filter_grad`` / ``jax.grad``: factored == merged
in outputs and gradients w.r.t. Θ; the base bit-identical after optax steps; every adapter leaf
trained; a fresh adapter gives the base bit for bit. LoRA dropout acts on the LoRA branch's input
only, one key one output; no key is no dropout, as on Flax without a ``dropout`` rng. An int8 or
NF4 base runs factored as the merged forward over the dequantised base, and its codes never move.
Equinox's own cells (``weight_ih`` / ``weight_hh``) are refused by name.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import quant
from tests import equinox_models
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

eqx = pytest.importorskip("equinox")

KEY = jax.random.key(0)
TARGETS = ["input_gates", "hidden_gates", "head"]


def _config(**options):
    return jaxlora.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False, **options)


def _setup(**options):
    config = _config(**options)
    frozen, lora = jaxlora.split(equinox_models.gru(), config, KEY)
    return config, frozen, lora


# Compiled once per run and shared by the tests (a fresh adapter's config differs from these
# only in its init, which the forward never reads).
@functools.cache
def _forward(rate=0.0):
    return eqx.filter_jit(jaxlora.factored(lambda model, xs: model(xs), _config(lora_dropout=rate)))


@functools.cache
def _base_forward():
    return eqx.filter_jit(lambda model, xs: model(xs))


def _loss(out):
    return jnp.sum(jnp.sin(out))


@functools.cache
def _both():
    """One compiled program: value and gradient w.r.t. Θ of the factored loss over ``frozen``
    (``eqx.filter_grad``) and of the merged loss over ``base`` (``jax.grad``): ``base`` is
    ``frozen``, or its dequantised copy when ``frozen`` is quantised."""
    config = _config()
    run = jaxlora.factored(lambda model, xs: model(xs), config)

    def factored(lora, frozen, xs):
        return _loss(run(frozen, lora, xs))

    def merged(lora, base, xs):
        return _loss(jaxlora.merge(base, lora, config)(xs))

    return eqx.filter_jit(
        lambda lora, frozen, base, xs: (
            eqx.filter_value_and_grad(factored)(lora, frozen, xs),
            jax.value_and_grad(merged)(lora, base, xs),
        )
    )


def _trained_every_leaf(grads):
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert float(jnp.abs(g).max()) > 0, f"{jax.tree_util.keystr(path)} gets no gradient"


def _check_laws(lora, frozen, base, steps=3):
    """factored == merged in value and Θ-gradient, every leaf trained; ``steps`` optax steps
    on Θ move every leaf and leave ``frozen`` bit-identical."""
    before = jax.tree.map(np.asarray, frozen)
    xs = equinox_models.sequence()
    both = _both()
    (value, grads), (value_m, grads_m) = both(lora, frozen, base, xs)
    np.testing.assert_allclose(value, value_m, rtol=1e-6, atol=1e-6)
    assert_trees_close(grads, grads_m, rtol=1e-5, atol=1e-6)
    _trained_every_leaf(grads)
    optimizer = optax.sgd(0.1)
    state, trained = optimizer.init(lora), lora
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, trained)
        trained = optax.apply_updates(trained, updates)
        (_, grads), _ = both(trained, frozen, base, xs)
    for (path, new), old in zip(
        jax.tree_util.tree_flatten_with_path(trained)[0], jax.tree.leaves(lora), strict=True
    ):
        assert not np.array_equal(new, old), f"{jax.tree_util.keystr(path)} never moved"
    assert_trees_bitwise_equal(frozen, before)


@pytest.mark.slow  # compiles the gradients of both paths through the scan
def test_recurrent_cell_factored_equals_merged_and_trains():
    _, frozen, lora = _setup()
    _check_laws(lora, frozen, frozen)
    assert frozen is equinox_models.gru()  # split hands the base back as it came


def test_recurrent_cell_fresh_adapter_is_the_base():
    model, xs = equinox_models.gru(), equinox_models.sequence()
    config = jaxlora.LoraConfig(r=2, target_modules=TARGETS)  # B = 0
    frozen, fresh = jaxlora.split(model, config, KEY)
    assert_trees_bitwise_equal(_forward()(frozen, fresh, xs), _base_forward()(model, xs))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("target_modules", [["cell"], "cell", ".*cell", ["weight_hh"]])
def test_equinox_recurrent_cells_are_refused_with_the_reason(kind, target_modules):
    """``eqx.nn.GRUCell`` / ``LSTMCell`` keep ``weight_ih`` and ``weight_hh`` in one module;
    naming it gets the reason and the way out, not an adapter that trains nothing."""
    model = equinox_models.with_cell(kind)
    config = jaxlora.LoraConfig(r=2, target_modules=target_modules)
    want = (
        r"no module matched `target_modules`.*the 2\+-D weights of `cell` \(weight_hh, "
        r"weight_ih\) have names LoRA does not adapt.*one Linear per weight.*`modules_to_save`"
    )
    with pytest.raises(ValueError, match=want):
        jaxlora.split(model, config, KEY)


def test_a_lone_equinox_cell_is_refused_with_the_reason():
    config = jaxlora.LoraConfig(r=2, target_modules=".*")
    with pytest.raises(
        ValueError, match=r"`params` \(in `split`\) holds no 'kernel'.*the 2\+-D weights of `cell`"
    ):
        jaxlora.split({"cell": equinox_models.with_cell("lstm").cell}, config, KEY)


def test_an_equinox_cell_trains_in_full_with_modules_to_save():
    model = equinox_models.with_cell("gru")
    config = jaxlora.LoraConfig(r=2, target_modules=["head"], modules_to_save=["cell"])
    _, lora = jaxlora.split(model, config, KEY)
    assert sorted(lora["cell"]) == ["bias", "bias_n", "weight_hh", "weight_ih"]
    assert sorted(lora["head"]) == ["lora_a", "lora_b"]


# LoRA dropout -----------------------------------------------------------------------------------

RATE = 0.5


@pytest.mark.slow  # compiles the scanned forward with and without dropout
def test_lora_dropout_one_key_one_output():
    """Under ``eqx.filter_jit``: a key gives one output, another key another; no key (or a
    rate of 0) is the deterministic forward, as the Flax path without a ``dropout`` rng."""
    _, frozen, lora = _setup()
    xs = equinox_models.sequence()
    run = _forward(RATE)
    k1, k2 = jax.random.split(jax.random.key(7))
    first = run(frozen, lora, xs, lora_key=k1)
    np.testing.assert_array_equal(run(frozen, lora, xs, lora_key=k1), first)
    assert not np.allclose(run(frozen, lora, xs, lora_key=k2), first)
    without = _forward()(frozen, lora, xs)
    assert not np.allclose(first, without)
    np.testing.assert_array_equal(run(frozen, lora, xs), without)  # no key: no dropout
    np.testing.assert_array_equal(_forward()(frozen, lora, xs, lora_key=k1), without)  # p = 0


def test_lora_dropout_masks_the_lora_input_only():
    """On one Linear: the output is ``W·x + b + s·B(A(m ⊙ x))`` for one inverted-dropout mask
    ``m`` (entries 0 or 1/(1-p)), found among all 2^4: the base term sees the whole ``x``."""
    config, frozen, lora = _setup(lora_dropout=RATE)
    x = equinox_models.sequence()[0]
    got = eqx.filter_jit(jaxlora.factored(lambda m, x: m.head(x), config))(
        frozen, lora, x, lora_key=jax.random.key(3)
    )
    a, b = (np.asarray(lora["head"][k], np.float64) for k in ("lora_a", "lora_b"))
    base = np.asarray(frozen.head(x), np.float64)
    scale = config.scale_for("head", 2)
    masks = [np.asarray(m) / (1 - RATE) for m in itertools.product([0.0, 1.0], repeat=x.size)]
    errors = [np.abs(base + scale * ((m * np.asarray(x)) @ a) @ b - got).max() for m in masks]
    best = int(np.argmin(errors))
    assert errors[best] < 1e-5, errors[best]
    assert 0 < masks[best].sum() < x.size / (1 - RATE)  # some inputs dropped, some kept


def test_lora_dropout_fresh_adapter_is_the_base():
    """With B = 0 the output under dropout is the base's, bit for bit: dropout touches only
    the LoRA branch."""
    model, xs = equinox_models.gru(), equinox_models.sequence()
    config = jaxlora.LoraConfig(r=2, target_modules=TARGETS, lora_dropout=RATE)
    frozen, fresh = jaxlora.split(model, config, KEY)
    got = _forward(RATE)(frozen, fresh, xs, lora_key=jax.random.key(5))
    assert_trees_bitwise_equal(got, _base_forward()(model, xs))


@pytest.mark.slow  # compiles a gradient through dropout masks in a scan
def test_lora_dropout_gradients_reach_every_leaf():
    config, frozen, lora = _setup(lora_dropout=RATE)
    run, xs = jaxlora.factored(lambda model, xs: model(xs), config), equinox_models.sequence()
    loss = lambda t, key: _loss(run(frozen, t, xs, lora_key=key))  # noqa: E731
    grads = jax.jit(jax.grad(loss))(lora, jax.random.key(5))  # plain jax.jit / jax.grad here
    _trained_every_leaf(grads)
    plain = _both()(lora, frozen, frozen, xs)[0][1]
    assert not np.allclose(grads["input_gates"]["lora_a"], plain["input_gates"]["lora_a"])


# Quantised bases --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_quantize_keeps_an_equinox_model_whole(method):
    """``quantize``, ``split_quantized``, ``dequantize_tree`` and ``requantization_error`` take
    an Equinox model and give one back, its (out, in) weights quantised in place."""
    config, float_frozen, lora = _setup()
    qfrozen = quant.quantize(float_frozen, ["input_gates", "hidden_gates"], method)
    assert type(qfrozen) is type(float_frozen) and quant.is_quantized(qfrozen.input_gates.weight)
    assert qfrozen.input_gates.weight.shape == (12, 4)  # Equinox's (out, in), as it came
    assert not quant.is_quantized(qfrozen.head.weight)
    assert_trees_bitwise_equal(quant.split_quantized(qfrozen, config, KEY)[1], lora)
    base = quant.dequantize_tree(qfrozen)
    assert type(base) is type(float_frozen) and base.input_gates.weight.dtype == jnp.float32
    step = {"int8": 0.01, "nf4": 0.2}[method]  # coarse bounds: the format's own tests are exact
    assert float(jnp.abs(base.input_gates.weight - float_frozen.input_gates.weight).max()) < step
    errors = quant.requantization_error(qfrozen, lora, config)
    assert sorted(errors) == ["hidden_gates", "input_gates"]
    assert all(0 < e["weight"] < 1 and np.isfinite(e["update"]) for e in errors.values())
    with pytest.raises(ValueError, match="`input_gates`") as again:  # a quantised kernel's
        quant.quantize(qfrozen, ["input_gates"], method)  # codes are no cell's weights
    assert "recurrent cell" not in str(again.value)


@pytest.mark.slow  # compiles the laws' program once more, over quantised leaves
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_equinox_base_runs_factored_as_the_dequantised_merge(method):
    """``factored`` over a quantised Equinox base equals ``merge`` over ``dequantize_tree`` of it
    in outputs and Θ-gradients; steps on Θ leave the codes and scales bit-identical."""
    _, float_frozen, lora = _setup()
    qfrozen = quant.quantize(float_frozen, ["input_gates", "hidden_gates"], method)
    _check_laws(lora, qfrozen, quant.dequantize_tree(qfrozen), steps=2)
