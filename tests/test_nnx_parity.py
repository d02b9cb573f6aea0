"""linen and NNX are equals outside the forward path: the same checks, one parametrised test each.

Files (orbax checkpoints, PEFT export/import), ``AdapterBank`` and sweeps (``stack``,
``unstack``, ``apply_mixed``, a vmapped seed sweep) run on a linen model and on its NNX twin, which
holds the same weights under the same paths (``nnx.State`` instead of a ``params`` dict). The
cross tests go further: a file written for one restores onto the other, and both export the same
bytes.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import adapters, checkpoint
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

VOCAB, D, H, OUT = 11, 8, 16, 3
KINDS = ["linen", "nnx"]
IDS = jax.random.randint(jax.random.key(5), (6, 4), 0, VOCAB)
CONFIG = jaxlora.LoraConfig(
    r=2, lora_alpha=4, target_modules=["embed", "up", "down"], init_lora_weights=False
)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, D, name="embed")(ids)
        h = jnp.tanh(nn.Dense(H, name="up")(x))
        return nn.Dense(OUT, name="down")(h).mean(axis=1)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, OUT, rngs=rngs)

    def __call__(self, ids):
        h = jnp.tanh(self.up(self.embed(ids)))
        return self.down(h).mean(axis=1)


def _linen_params():
    return LinenNet().init(jax.random.key(0), IDS)["params"]


def _model(kind):
    """``(model for jaxlora.apply, frozen base)``: for NNX the graphdef and an ``nnx.State``
    holding linen's weights, so both kinds compute the same function."""
    params = _linen_params()
    if kind == "linen":
        return LinenNet(), params
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def _forward(kind, model, params, ids=IDS):
    if kind == "linen":
        return model.apply({"params": params}, ids)
    return nnx.merge(model, params)(ids)


def _abstract(frozen):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)


def _adapter(frozen, seed, config=CONFIG):
    return jaxlora.split(frozen, config, jax.random.key(seed))[1]


@pytest.mark.slow  # compiles both twins (2.7 s in the fast core)
def test_the_twins_compute_the_same_function():
    (linen, params), (graphdef, state) = _model("linen"), _model("nnx")
    assert jax.tree.structure(nnx.to_pure_dict(state)) == jax.tree.structure(params)
    lora = {kind: _adapter(_model(kind)[1], 1) for kind in KINDS}
    assert_trees_bitwise_equal(lora["nnx"], lora["linen"])
    for mode in ("factored", "merged"):
        got = jaxlora.apply(graphdef, state, lora["nnx"], CONFIG, IDS, mode=mode)
        want = jaxlora.apply(linen, params, lora["linen"], CONFIG, IDS, mode=mode)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# ---- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_checkpoint_round_trip(kind, tmp_path):
    model, frozen = _model(kind)
    lora = _adapter(frozen, 1)
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(lora)
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        checkpoint.save(manager, 3, lora, CONFIG, opt_state=opt_state)
    with checkpoint.checkpoint_manager(tmp_path) as manager:
        restored = checkpoint.restore(manager, frozen, optimizer=optimizer)
        from_shapes = checkpoint.restore(manager, _abstract(frozen))  # no base bytes needed
    assert restored.step == 3 and restored.config == CONFIG
    assert_trees_bitwise_equal(restored.lora, lora)
    assert_trees_bitwise_equal(restored.opt_state, opt_state)
    assert_trees_bitwise_equal(from_shapes.lora, lora)
    got = jaxlora.apply(model, frozen, restored.lora, CONFIG, IDS)
    np.testing.assert_array_equal(got, jaxlora.apply(model, frozen, lora, CONFIG, IDS))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_round_trip(kind, tmp_path):
    model, frozen = _model(kind)
    lora = _adapter(frozen, 2)
    jaxlora.save_peft(tmp_path, lora, CONFIG, frozen)
    loaded, config = jaxlora.load_peft(tmp_path, frozen)
    assert_trees_bitwise_equal(loaded, lora)
    assert (config.r, config.lora_alpha) == (CONFIG.r, CONFIG.lora_alpha)
    want = _forward(kind, model, jaxlora.merge(frozen, lora, CONFIG))
    np.testing.assert_allclose(jaxlora.apply(model, frozen, loaded, config, IDS), want, atol=1e-6)


def test_files_cross_between_linen_and_nnx(tmp_path):
    """One adapter, two bases: the same PEFT bytes, and each kind's checkpoint restores onto the
    other's base."""
    bases = {kind: _model(kind)[1] for kind in KINDS}
    lora = _adapter(bases["linen"], 3)
    for kind, frozen in bases.items():
        jaxlora.save_peft(tmp_path / kind, lora, CONFIG, frozen)
    tensors = [load_file(tmp_path / kind / jaxlora.peft.WEIGHTS_FILE) for kind in KINDS]
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) == 6
    for key in tensors[0]:
        np.testing.assert_array_equal(tensors[0][key], tensors[1][key], err_msg=key)
    documents = [json.loads((tmp_path / k / jaxlora.peft.CONFIG_FILE).read_text()) for k in KINDS]
    assert documents[0] == documents[1]
    for writer, reader in (("linen", "nnx"), ("nnx", "linen")):
        with checkpoint.checkpoint_manager(tmp_path / f"ckpt_{writer}") as manager:
            checkpoint.save(manager, 0, lora, CONFIG)
            assert_trees_bitwise_equal(checkpoint.restore(manager, bases[reader]).lora, lora)


# ---- many adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bank_switches_exactly_and_weighted_sum_is_exact(kind):
    model, frozen = _model(kind)
    bank = adapters.AdapterBank(frozen)
    config_b = dataclasses.replace(CONFIG, r=3, target_modules=["up"])
    bank.add("a", _adapter(frozen, 1), CONFIG)
    bank.add("b", _adapter(frozen, 2, config_b), config_b)
    first = _forward(kind, model, bank.params("a"))
    _forward(kind, model, bank.params("b"))
    np.testing.assert_array_equal(_forward(kind, model, bank.params("a")), first)
    assert bank.params(None) is frozen
    want = jaxlora.apply(model, frozen, *bank.get("a"), IDS, mode="merged")
    np.testing.assert_array_equal(first, want)
    lora, config = bank.add_weighted({"a": 0.5, "b": 2.0})

    def kernel(params):
        return nnx.to_pure_dict(params) if kind == "nnx" else params

    base, combined = kernel(frozen), kernel(jaxlora.merge(frozen, lora, config))
    merged = {name: kernel(bank.params(name)) for name in ("a", "b")}
    for module, leaf in (("up", "kernel"), ("down", "kernel"), ("embed", "embedding")):
        got = combined[module][leaf] - base[module][leaf]
        want = sum(
            w * (merged[n][module][leaf] - base[module][leaf]) for n, w in (("a", 0.5), ("b", 2.0))
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=module)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_stack_unstack_and_mixed_batch(kind, use_jit):
    model, frozen = _model(kind)
    fresh = _adapter(frozen, 0, dataclasses.replace(CONFIG, init_lora_weights=True))
    members = [_adapter(frozen, 1), _adapter(frozen, 2), fresh]  # B = 0: the base model
    stacked = adapters.stack(members)
    for got, member in zip(adapters.unstack(stacked), members, strict=True):
        assert_trees_bitwise_equal(got, member)
    index = jnp.array([0, 2, 1, 1, 0, 2])
    mixed = adapters.apply_mixed
    if use_jit:
        mixed = jax.jit(mixed, static_argnums=(0, 3))
    got = mixed(model, frozen, stacked, CONFIG, index, IDS)
    want = jnp.concatenate(
        [
            jaxlora.apply(model, frozen, members[int(k)], CONFIG, IDS[i : i + 1], mode="merged")
            for i, k in enumerate(index)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    base_rows = np.asarray(index) == 2
    plain = _forward(kind, model, frozen)
    np.testing.assert_allclose(got[base_rows], plain[base_rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow  # seconds of compiling: full suite only
def test_seed_sweep_in_one_vmapped_step_equals_separate_runs(kind):
    model, frozen = _model(kind)
    optimizer = optax.sgd(0.5)
    labels = jnp.arange(IDS.shape[0]) % OUT

    def step(lora, opt_state):
        def loss(lora):
            logits = jaxlora.apply(model, frozen, lora, CONFIG, IDS)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    members = [_adapter(frozen, s) for s in range(3)]
    lora = adapters.stack(members)
    opt_state = jax.vmap(optimizer.init)(lora)
    sweep = jax.jit(jax.vmap(step))
    for _ in range(3):
        lora, opt_state, values = sweep(lora, opt_state)
    for got, member in zip(adapters.unstack(lora), members, strict=True):
        one, state = member, optimizer.init(member)
        for _ in range(3):
            one, state, value = jax.jit(step)(one, state)
        assert_trees_close(got, one, atol=1e-6)
    assert values.shape == (3,) and bool(jnp.all(jnp.isfinite(values)))
