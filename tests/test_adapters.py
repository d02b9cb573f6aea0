"""Many adapters on one base: switch and disable exactly, weighted combinations, vmapped sweeps."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import adapters
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close


def _base():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "l1": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
        "stack": {"kernel": jax.random.normal(k2, (3, 8, 8))},
        "l2": {"kernel": jax.random.normal(k3, (8, 4)), "bias": jnp.zeros(4)},
    }


LAYOUTS = {"stack": "sio"}


def _forward(params, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    for i in range(3):
        h = h + jnp.tanh(h @ params["stack"]["kernel"][i])
    return h @ params["l2"]["kernel"] + params["l2"]["bias"][None]


def _config(**overrides):
    fields = dict(r=2, target_modules=["l1", "stack"], layouts=LAYOUTS, init_lora_weights=False)
    return jaxlora.LoraConfig(**{**fields, **overrides})


def _updates(params, base):
    return {
        k: params[k]["kernel"].astype(jnp.float32) - base[k]["kernel"].astype(jnp.float32)
        for k in base
    }


X = jax.random.normal(jax.random.key(9), (5, 6))


@pytest.mark.slow
def test_switch_and_disable_are_exact():
    base = _base()
    bank = adapters.AdapterBank(base)
    configs = {"a": _config(), "b": _config(r=3, target_modules=["l2"])}
    for seed, (name, config) in enumerate(configs.items()):
        bank.add(name, jaxlora.split(base, config, jax.random.key(seed))[1], config)
    assert bank.names == ["a", "b"]
    first = _forward(bank.params("a"), X)
    _forward(bank.params("b"), X)
    assert_trees_bitwise_equal(_forward(bank.params("a"), X), first)
    assert_trees_bitwise_equal(bank.params("a"), jaxlora.merge(base, *bank.get("a")))
    assert bank.params(None) is base
    assert_trees_bitwise_equal(_forward(bank.params(None), X), _forward(base, X))
    assert not np.allclose(first, _forward(base, X))
    bank.remove("a")
    assert bank.names == ["b"]


@pytest.mark.slow
def test_bank_errors():
    base = _base()
    bank = adapters.AdapterBank(base)
    config = _config()
    _, lora = jaxlora.split(base, config, jax.random.key(0))
    with pytest.raises(KeyError, match=r"no adapter named 'x'; adapters: \[\]"):
        bank.get("x")
    with pytest.raises(TypeError, match="`name` must be a non-empty string"):
        bank.add("", lora, config)
    other = {**base, "l1": {"kernel": jnp.zeros((6, 9)), "bias": jnp.zeros(9)}}
    with pytest.raises(
        ValueError, match=r"the adapter 'a' does not fit `frozen`: `l1/lora_b` stored"
    ):
        adapters.AdapterBank(other).add("a", lora, config)


ADAPTER_CONFIGS = [
    _config(r=2, lora_alpha=4),
    _config(r=3, lora_alpha=2, use_rslora=True, target_modules=["stack", "l2"]),
    _config(r=1, lora_alpha=1, rank_pattern={"l1": 4}, alpha_pattern={"stack": 3.0}),
]
WEIGHTS = [0.7, -0.4, 1.5]


def _three(base):
    loras = [
        jaxlora.split(base, c, jax.random.key(10 + i))[1] for i, c in enumerate(ADAPTER_CONFIGS)
    ]
    return list(zip(loras, ADAPTER_CONFIGS, WEIGHTS, strict=True))


def _dense_weighted_sum(base, triples):
    total = {k: jnp.zeros(base[k]["kernel"].shape) for k in base}
    for lora, config, weight in triples:
        for k, update in _updates(jaxlora.merge(base, lora, config), base).items():
            total[k] = total[k] + weight * update
    return total


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.slow
def test_cat_is_the_exact_weighted_sum(use_jit):
    base = _base()
    triples = _three(base)
    combine = adapters.add_weighted
    if use_jit:
        combine = jax.jit(adapters.add_weighted, static_argnames=("method", "rank"))
    lora, config = combine(base, triples, method="cat")
    ranks = {t.path: t.rank for t in jaxlora.find_targets(base, config)}
    assert ranks == {"l1": 2 + 4, "l2": 3, "stack": 2 + 3 + 1}
    assert all(t.scale == 1.0 for t in jaxlora.find_targets(base, config))
    got = _updates(jaxlora.merge(base, lora, config), base)
    assert_trees_close(got, _dense_weighted_sum(base, triples), atol=1e-5)


@pytest.mark.slow
def test_svd_at_full_rank_is_exact_and_truncation_is_eckart_young():
    base = _base()
    triples = _three(base)
    expected = _dense_weighted_sum(base, triples)
    lora, config = adapters.add_weighted(base, triples, method="svd")
    got = _updates(jaxlora.merge(base, lora, config), base)
    assert_trees_close(got, expected, atol=1e-4)

    lora, config = adapters.add_weighted(base, triples, method="svd", rank=2)
    assert {t.path: t.rank for t in jaxlora.find_targets(base, config)} == {
        "l1": 2,
        "stack": 2,
        "l2": 2,
    }
    got = _updates(jaxlora.merge(base, lora, config), base)
    for name in ("l1", "l2"):
        singular = np.linalg.svd(np.asarray(expected[name]), compute_uv=False)
        error = np.linalg.norm(np.asarray(got[name] - expected[name]))
        np.testing.assert_allclose(error, np.sqrt((singular[2:] ** 2).sum()), rtol=1e-4)
    for i in range(3):  # each layer of the stack on its own
        singular = np.linalg.svd(np.asarray(expected["stack"][i]), compute_uv=False)
        error = np.linalg.norm(np.asarray(got["stack"][i] - expected["stack"][i]))
        np.testing.assert_allclose(error, np.sqrt((singular[2:] ** 2).sum()), rtol=1e-4)


@pytest.mark.slow  # 1.7 s in the fast core
def test_naive_linear_mix_is_not_the_weighted_sum():
    """The documented pitfall: (Σ w_i A_i)(Σ w_i B_i) has cross terms w_i w_j A_i B_j."""
    base = _base()
    config = _config()
    one, two = (jaxlora.split(base, config, jax.random.key(k))[1] for k in (1, 2))
    naive = jax.tree.map(lambda p, q: 0.5 * p + 0.5 * q, one, two)
    triples = [(one, config, 0.5), (two, config, 0.5)]
    exact = _dense_weighted_sum(base, triples)
    got = _updates(jaxlora.merge(base, naive, config), base)
    assert np.abs(np.asarray(got["l1"] - exact["l1"])).max() > 1e-2


def test_copies_combine_as_weighted_deltas():
    base = _base()
    config = _config(bias="all")
    one, two = (jaxlora.split(base, config, jax.random.key(k))[1] for k in (1, 2))
    one["l1"]["bias"] = one["l1"]["bias"] + 1.0
    two["l1"]["bias"] = two["l1"]["bias"] + 3.0
    lora, _ = adapters.add_weighted(base, [(one, config, 0.5), (two, config, 0.25)])
    np.testing.assert_allclose(lora["l1"]["bias"], np.full(8, 1.25), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(lora["l2"]["bias"], np.zeros(4, np.float32))


def test_combine_errors():
    base = _base()
    lora = jaxlora.split(base, _config(), jax.random.key(0))[1]
    with pytest.raises(ValueError, match=r"`method` must be one of \('cat', 'svd'\), got 'linear'"):
        adapters.add_weighted(base, [(lora, _config(), 1.0)], method="linear")
    with pytest.raises(ValueError, match="`adapters` is empty"):
        adapters.add_weighted(base, [])
    other = _config(bias="all")
    lora_all = jaxlora.split(base, other, jax.random.key(0))[1]
    with pytest.raises(ValueError, match="different `bias` \\('none' vs 'all'\\) cannot be"):
        adapters.add_weighted(base, [(lora, _config(), 1.0), (lora_all, other, 1.0)])
    bank = adapters.AdapterBank(base)
    bank.add("a", lora, _config())
    summed = adapters.add_weighted(base, [(lora, _config(), 2.0)])
    assert summed[1] == bank.add_weighted({"a": 2.0})[1]


# --- several adapters trained in one vmapped step -----------------------------------------------


def _loss(lora, frozen, config, x, y, multiplier=None):
    if multiplier is not None:
        lora = adapters.scale_b(lora, multiplier)
    return jnp.mean((_forward(jaxlora.merge(frozen, lora, config), x) - y) ** 2)


def _batch(step):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(3), step))
    return jax.random.normal(kx, (8, 6)), jax.random.normal(ky, (8, 4))


OPTIMIZER = optax.adam(1e-2)


def _step(config):
    def step(lora, opt_state, frozen, x, y, multiplier=None):
        grads = jax.grad(_loss)(lora, frozen, config, x, y, multiplier)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    return step


def _separately(base, config, lora, steps=5):
    step = jax.jit(_step(config))
    opt_state = OPTIMIZER.init(lora)
    for i in range(steps):
        lora, opt_state = step(lora, opt_state, base, *_batch(i))
    return lora


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_seed_sweep_in_one_vmapped_step_equals_separate_runs():
    base, config = _base(), _config(init_lora_weights=True)
    members = [jaxlora.split(base, config, jax.random.key(s))[1] for s in range(3)]
    lora = adapters.stack(members)
    opt_state = jax.vmap(OPTIMIZER.init)(lora)
    step = jax.jit(jax.vmap(_step(config), in_axes=(0, 0, None, None, None)))
    for i in range(5):
        lora, opt_state = step(lora, opt_state, base, *_batch(i))
    for got, member in zip(adapters.unstack(lora), members, strict=True):
        assert_trees_close(got, _separately(base, config, member), atol=1e-6)


@pytest.mark.standard_dtypes
@pytest.mark.slow
def test_rank_sweep_padded_in_one_vmapped_step_equals_separate_runs():
    base = _base()
    configs = [_config(r=r, lora_alpha=4, init_lora_weights=True) for r in (1, 2, 4)]
    members = [jaxlora.split(base, c, jax.random.key(7))[1] for c in configs]
    padded = [adapters.pad_rank(base, m, c, 4) for m, c in zip(members, configs, strict=True)]
    padded_config = padded[0][2]
    lora = adapters.stack([p[0] for p in padded])
    multiplier = adapters.stack([p[1] for p in padded])
    opt_state = jax.vmap(OPTIMIZER.init)(lora)
    step = jax.jit(jax.vmap(_step(padded_config), in_axes=(0, 0, None, None, None, 0)))
    for i in range(5):
        lora, opt_state = step(lora, opt_state, base, *_batch(i), multiplier)
    for got, member, config in zip(adapters.unstack(lora), members, configs, strict=True):
        expected = _separately(base, config, member)
        r = config.r
        for name in ("l1", "stack"):
            a, b = got[name]["lora_a"], got[name]["lora_b"]
            assert not np.any(np.asarray(a[..., r:])) and not np.any(np.asarray(b[..., r:, :]))
            np.testing.assert_allclose(a[..., :r], expected[name]["lora_a"], atol=1e-6)
            np.testing.assert_allclose(b[..., :r, :], expected[name]["lora_b"], atol=1e-6)


@pytest.mark.slow
def test_stack_and_pad_errors():
    base = _base()
    one = jaxlora.split(base, _config(r=2), jax.random.key(0))[1]
    two = jaxlora.split(base, _config(r=3), jax.random.key(0))[1]
    with pytest.raises(ValueError, match=r"`adapters\[1\]` differs from `adapters\[0\]`"):
        adapters.stack([one, two])
    with pytest.raises(ValueError, match="`adapters` is empty"):
        adapters.stack([])
    with pytest.raises(ValueError, match="`rank`=2 is below the rank 3 of `l1`"):
        adapters.pad_rank(base, two, _config(r=3), 2)


# --- mixed-batch inference ------------------------------------------------------------------


class _Tagger(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 8, name="embed")(ids)
        h = h + jnp.tanh(nn.Dense(8, name="query")(h))
        return nn.Dense(3, name="head")(h.mean(1))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.slow
def test_mixed_batch_equals_separate_runs(use_jit):
    model = _Tagger()
    ids = jax.random.randint(jax.random.key(0), (6, 5), 0, 11)
    params = model.init(jax.random.key(1), ids)["params"]
    config = jaxlora.LoraConfig(r=2, target_modules=["embed", "query"], init_lora_weights=False)
    fresh = jaxlora.split(
        params, dataclasses.replace(config, init_lora_weights=True), jax.random.key(0)
    )
    members = [jaxlora.split(params, config, jax.random.key(s))[1] for s in range(2)]
    members.append(fresh[1])  # B = 0: the base model
    index = jnp.array([0, 2, 1, 1, 0, 2])
    mixed = adapters.apply_mixed
    if use_jit:
        mixed = jax.jit(adapters.apply_mixed, static_argnums=(0, 3))
    got = mixed(model, params, adapters.stack(members), config, index, ids)
    separate = [jaxlora.merge(params, members[int(k)], config) for k in index]
    want = jnp.concatenate(
        [model.apply({"params": p}, ids[i : i + 1]) for i, p in enumerate(separate)]
    )
    print(f"mixed batch vs separate merged runs: max |diff| {jnp.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    base_rows = np.asarray(index) == 2
    plain = model.apply({"params": params}, ids)
    np.testing.assert_allclose(got[base_rows], plain[base_rows], rtol=0, atol=1e-6)


def test_mixed_batch_index_errors():
    with pytest.raises(ValueError, match=r"one adapter index per example, shape \(batch,\); got"):
        adapters.apply_mixed(
            _Tagger(),
            {},
            {},
            jaxlora.LoraConfig(r=1, target_modules=["q"]),
            jnp.zeros((2, 1), jnp.int32),
            jnp.zeros((2, 5), jnp.int32),
        )
