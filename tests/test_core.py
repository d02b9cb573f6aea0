import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import LoraConfig, infer_layouts
from jaxlora._src import paths
from tests import linen_models as lm
from tests.treeutil import assert_trees_bitwise_equal, assert_trees_close

DTYPES = [jnp.float32, jnp.bfloat16]


@functools.cache  # one model per (scan, dtype) for the module: jax arrays are immutable
def decoder(scan, dtype=jnp.float32):
    model = lm.Decoder(scan=scan)
    return model, lm.init(model, lm.ids(), dtype), infer_layouts(model, lm.ids())


def maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_fresh_adapter_merges_to_identical_bits(scan, dtype, use_jit):
    _, params, layouts = decoder(scan, dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", layouts=layouts)
    frozen, lora = maybe_jit(jaxlora.split, use_jit)(params, config, jax.random.key(1))
    assert frozen is params or use_jit
    merged = maybe_jit(jaxlora.merge, use_jit)(frozen, lora, config)
    assert_trees_bitwise_equal(merged, params)


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.slow
def test_fresh_embedding_and_conv_adapters_are_no_ops(init):
    _, params, _ = decoder(False)
    config = LoraConfig(r=2, target_modules=["embed"], init_lora_weights=init)
    assert_trees_bitwise_equal(
        jaxlora.merge(*jaxlora.split(params, config, jax.random.key(0)), config), params
    )
    conv = lm.init(lm.ConvNet(), lm.images())
    config = LoraConfig(
        r=2, target_modules=["conv1"], layouts={"conv1": "wwio"}, init_lora_weights=init
    )
    assert_trees_bitwise_equal(
        jaxlora.merge(*jaxlora.split(conv, config, jax.random.key(0)), config), conv
    )


def low_rank_update(params, config, seed=3):
    """An adapter whose factors are both random, so its update is not zero."""
    noisy = LoraConfig(**{**config.to_dict(), "init_lora_weights": False})
    frozen, lora = jaxlora.split(params, noisy, jax.random.key(seed))
    return frozen, lora


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_update_has_rank_at_most_r_on_targets_and_is_zero_elsewhere(scan):
    _, params, layouts = decoder(scan)
    r = 3
    config = LoraConfig(r=r, target_modules=["query", "out", "fc1"], layouts=layouts)
    frozen, lora = low_rank_update(params, config)
    merged = jaxlora.merge(frozen, lora, config)
    targets = {t.path: t for t in jaxlora.find_targets(params, config)}
    for _, names, before in paths.flatten(params):
        after = paths.get_in(merged, tuple(names))
        module = "/".join(names[:-1])
        diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
        if module not in targets or names[-1] != "kernel":
            assert not diff.any(), module
            continue
        t = targets[module]
        per_layer = diff.reshape((-1,) + diff.shape[t.n_stack :]) if t.n_stack else diff[None]
        for layer in per_layer:
            matrix = layer.reshape(int(np.prod(t.a_shape[t.n_stack : -1])), -1)
            assert 0 < np.linalg.matrix_rank(matrix, tol=1e-6) <= r, module


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_unmerge_inverts_merge(scan, use_jit):
    _, params, layouts = decoder(scan)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", layouts=layouts)
    frozen, lora = low_rank_update(params, config)
    merged = maybe_jit(jaxlora.merge, use_jit)(frozen, lora, config)
    restored = maybe_jit(jaxlora.unmerge, use_jit)(merged, lora, config)
    assert_trees_close(restored, params, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rslora", [False, True])
def test_update_is_scaled_alpha_over_r(rslora):
    params = {"q": {"kernel": jnp.zeros((6, 5))}}
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q"], use_rslora=rslora)
    frozen, lora = low_rank_update(params, config)
    merged = jaxlora.merge(frozen, lora, config)["q"]["kernel"]
    a, b = np.asarray(lora["q"]["lora_a"]), np.asarray(lora["q"]["lora_b"])
    scale = 12 / (2.0 if rslora else 4.0)
    np.testing.assert_allclose(merged, scale * a @ b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_rank_pattern_sets_factor_shapes():
    _, params, layouts = decoder(False)
    config = LoraConfig(
        r=8, target_modules=["fc1"], rank_pattern={"layer_1/fc1": 2}, layouts=layouts
    )
    _, lora = jaxlora.split(params, config, jax.random.key(0))
    assert lora["layer_0"]["fc1"]["lora_a"].shape == (16, 8)
    assert lora["layer_1"]["fc1"]["lora_a"].shape == (16, 2)
    assert lora["layer_1"]["fc1"]["lora_b"].shape == (2, 32)


@pytest.mark.slow
def test_init_distributions():
    params = {"d": {"kernel": jnp.zeros((400, 300))}}
    _, lora = jaxlora.split(params, LoraConfig(r=64, target_modules=["d"]), jax.random.key(0))
    a = np.asarray(lora["d"]["lora_a"])
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert not np.asarray(lora["d"]["lora_b"]).any()
    config = LoraConfig(r=64, target_modules=["d"], init_lora_weights="gaussian")
    _, lora = jaxlora.split(params, config, jax.random.key(0))
    assert np.std(np.asarray(lora["d"]["lora_a"])) == pytest.approx(1 / 64, rel=0.05)
    embed = {"e": {"embedding": jnp.zeros((50, 20))}}
    _, lora = jaxlora.split(embed, LoraConfig(r=4, target_modules=["e"]), jax.random.key(0))
    assert not np.asarray(lora["e"]["lora_a"]).any()
    assert np.asarray(lora["e"]["lora_b"]).std() > 0.5


@pytest.mark.slow
def test_init_is_keyed_by_path():
    _, params, layouts = decoder(False)
    one = LoraConfig(target_modules=["fc1"], init_lora_weights="gaussian", layouts=layouts)
    two = LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights="gaussian", layouts=layouts)
    _, lora_one = jaxlora.split(params, one, jax.random.key(0))
    _, lora_two = jaxlora.split(params, two, jax.random.key(0))
    np.testing.assert_array_equal(
        lora_one["layer_1"]["fc1"]["lora_a"], lora_two["layer_1"]["fc1"]["lora_a"]
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_adapter_dtype_is_config_dtype_and_merge_keeps_base_dtype(dtype):
    _, params, layouts = decoder(False, jnp.bfloat16)
    config = LoraConfig(target_modules=["fc1"], dtype=dtype, layouts=layouts)
    frozen, lora = low_rank_update(params, config)
    assert lora["layer_0"]["fc1"]["lora_a"].dtype == jnp.dtype(dtype)
    merged = jaxlora.merge(frozen, lora, config)
    assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, params)


@pytest.mark.slow
def test_bias_modes():
    _, params, layouts = decoder(False)
    base = dict(target_modules=["fc1"], layouts=layouts)
    _, lora = jaxlora.split(params, LoraConfig(bias="none", **base), jax.random.key(0))
    assert "bias" not in lora["layer_0"]["fc1"]
    _, lora = jaxlora.split(params, LoraConfig(bias="lora_only", **base), jax.random.key(0))
    assert set(lora["layer_0"]["fc1"]) == {"lora_a", "lora_b", "bias"}
    assert "fc2" not in lora["layer_0"]
    _, lora = jaxlora.split(params, LoraConfig(bias="all", **base), jax.random.key(0))
    assert set(lora["layer_0"]["fc2"]) == {"bias"}
    assert set(lora["ln_f"]) == {"bias"} and set(lora["lm_head"]) == {"bias"}
    n_bias = sum(1 for _, n, _ in paths.flatten(params) if n[-1] == "bias")
    n_lora_bias = sum(1 for _, n, _ in paths.flatten(lora) if n[-1] == "bias")
    assert n_lora_bias == n_bias


@pytest.mark.slow  # compiles several steps (3.8 s in the fast core)
def test_trainable_copies_are_used_by_merge_and_not_aliased():
    _, params, layouts = decoder(False)
    config = LoraConfig(
        target_modules=["fc1"], modules_to_save=["lm_head"], bias="lora_only", layouts=layouts
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(0))
    assert set(lora["lm_head"]) == {"kernel", "bias"}
    assert lora["lm_head"]["kernel"] is not params["lm_head"]["kernel"]
    lora = jax.tree.map(lambda x: x + 1, lora)
    merged = jaxlora.merge(frozen, lora, config)
    np.testing.assert_array_equal(merged["lm_head"]["kernel"], params["lm_head"]["kernel"] + 1)
    np.testing.assert_array_equal(
        merged["layer_2"]["fc1"]["bias"], params["layer_2"]["fc1"]["bias"] + 1
    )
    unmerged = jaxlora.unmerge(merged, lora, config)
    np.testing.assert_array_equal(unmerged["lm_head"]["kernel"], merged["lm_head"]["kernel"])


def test_combine_and_partition_are_inverse():
    _, params, layouts = decoder(False)
    config = LoraConfig(
        target_modules=["fc1"], modules_to_save=["lm_head"], bias="lora_only", layouts=layouts
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(0))
    combined = jaxlora.combine(frozen, lora)
    assert set(combined["layer_0"]["fc1"]) == {"kernel", "bias", "lora_a", "lora_b"}
    frozen_again, lora_again = jaxlora.partition(combined, config)
    assert_trees_bitwise_equal(lora_again, lora)
    assert_trees_bitwise_equal(frozen_again, params)


def gpt3_abstract(n_layers=96, d_model=12288):
    """GPT-3 175B's kernels as abstract shapes: nothing is allocated."""

    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float16)

    layer = {
        "attn": {
            name: {"kernel": sds(d_model, d_model), "bias": sds(d_model)}
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        },
        "mlp": {
            "fc_in": {"kernel": sds(d_model, 4 * d_model), "bias": sds(4 * d_model)},
            "fc_out": {"kernel": sds(4 * d_model, d_model), "bias": sds(d_model)},
        },
    }
    return {
        "wte": {"embedding": sds(50257, d_model)},
        "wpe": {"embedding": sds(2048, d_model)},
        **{f"h_{i}": layer for i in range(n_layers)},
    }


@pytest.mark.parametrize(("r", "expected"), [(1, 4_718_592), (8, 37_748_736)])
@pytest.mark.slow  # seconds of compiling: full suite only
def test_gpt3_counted_without_allocating(r, expected):
    params = gpt3_abstract()
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"])
    frozen, lora = jax.eval_shape(lambda p: jaxlora.split(p, config, jax.random.key(0)), params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(lora))
    counts = jaxlora.count(frozen, lora)
    assert counts.trainable == expected
    assert counts.total - expected == pytest.approx(175e9, rel=0.01)
    assert f"trainable params: {expected:,}" in counts.summary()


@pytest.mark.slow  # seconds of compiling: full suite only
def test_count_table_and_modules_to_save():
    params = {
        "q": {"kernel": jnp.ones((10, 10))},
        "head": {"kernel": jnp.ones((10, 2)), "bias": jnp.ones(2)},
    }
    config = LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"])
    counts = jaxlora.count(*jaxlora.split(params, config, jax.random.key(0)))
    assert counts.trainable == 40 + 22
    assert counts.total == 100 + 22 + 40
    assert "head" in counts.table() and "q" in counts.table()
    assert jaxlora.count(params).trainable == 0


def test_merge_errors():
    params = {"q": {"kernel": jnp.ones((4, 6))}, "v": {"kernel": jnp.ones((4, 6))}}
    config = LoraConfig(r=2, target_modules=["q"])
    frozen, lora = jaxlora.split(params, config, jax.random.key(0))
    with pytest.raises(TypeError, match="`config` must be a jaxlora.LoraConfig"):
        jaxlora.merge(frozen, lora, {"r": 2})
    bad = {"q": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 6))}}
    with pytest.raises(
        ValueError, match=r"factors at `q` do not fit the kernel \(4, 6\): got lora_a \(5, 2\)"
    ):
        jaxlora.merge(frozen, bad, config)
    with pytest.raises(ValueError, match="has `lora_a` but no `lora_b` at `q`"):
        jaxlora.merge(frozen, {"q": {"lora_a": jnp.ones((4, 2))}}, config)
    extra = {**lora, "k": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 6))}}
    with pytest.raises(ValueError, match="`lora` leaves k/lora_a, k/lora_b have no counterpart"):
        jaxlora.merge(frozen, extra, config)
    with pytest.raises(ValueError, match="`lora` leaf `v/kernel` has shape"):
        jaxlora.merge(frozen, {**lora, "v": {"kernel": jnp.ones((3, 3))}}, config)
    dora = {"q": {**lora["q"], "lora_magnitude": jnp.ones(5)}}
    with pytest.raises(ValueError, match=r"`lora_magnitude` at `q` has shape \(5,\); the kernel"):
        jaxlora.merge(frozen, dora, config)
    with pytest.raises(ValueError, match="`variant` must be one of"):
        jaxlora.split(params, config, jax.random.key(0), variant="vera")
    with pytest.raises(TypeError, match="`frozen` must be a params pytree"):
        jaxlora.combine("params", lora)
    with pytest.raises(ValueError, match="`lora` leaf `w/kernel` has no counterpart in `frozen`"):
        jaxlora.count(frozen, {"w": {"kernel": jnp.ones(2)}})
