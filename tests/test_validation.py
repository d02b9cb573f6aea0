"""Every bad input is a clear error, never a silent wrong result.

One test per class of mistake (each message names the argument, the path where there is one, and
what to do), then property tests: over generated configs, target patterns, layouts and adapter
trees, every input either works (split -> merge -> unmerge round-trips) or raises a
ValueError / TypeError naming the offending field.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from jaxlora import LoraConfig

KEY = jax.random.key(0)


def _params():
    return {
        "up": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)},
        "down": {"kernel": jnp.ones((6, 2))},
        "norm": {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
    }


# --- config: target patterns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": ["up", "dwon"]}, r"entries \['dwon'\].*did you mean \['down'\]"),
        ({"target_modules": ["up", "norm"]}, r"\['norm'\].*`norm` holds only \['bias', 'scale'\]"),
        ({"target_modules": ["norm"]}, r"`target_modules` entries \['norm'\]"),
        ({"target_modules": ["up"], "exclude_modules": "zz.*"}, r"`exclude_modules` regex"),
        ({"target_modules": ["up"], "exclude_modules": ["zz"]}, r"`exclude_modules` entries"),
    ],
)
def test_every_target_and_exclude_entry_must_match(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxlora.split(_params(), LoraConfig(**kwargs), KEY)


def test_a_target_naming_a_container_module_says_to_name_its_layers():
    params = {"attn": {"q": {"kernel": jnp.ones((4, 4))}}, "mlp": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match=r"'attn': it is a module holding the kernels attn/q"):
        jaxlora.split(params, LoraConfig(target_modules=["mlp", "attn"]), KEY)


def test_integer_and_bool_kernels_are_never_targets():
    params = {
        "ids": {"kernel": jnp.ones((4, 4), jnp.int32)},
        "mask": {"kernel": jnp.ones((4, 4), bool)},
        "v": {"kernel": jnp.ones((4, 4))},
    }
    for name in ("ids", "mask"):
        with pytest.raises(ValueError, match=rf"integer or bool weights `{name}`.*exclude_modules"):
            jaxlora.split(params, LoraConfig(target_modules=[name, "v"]), KEY)
    with pytest.raises(ValueError, match="integer or bool weights `ids`"):
        jaxlora.split(params, LoraConfig(target_modules=".*"), KEY)
    _, lora = jaxlora.split(params, LoraConfig(target_modules="all-linear"), KEY)
    assert set(lora) == {"v"}


# --- config: numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lora_alpha": 0}, "`lora_alpha` must be a finite number > 0"),
        ({"lora_alpha": -8}, "`lora_alpha` must be a finite number > 0"),
        ({"lora_alpha": math.inf}, "`lora_alpha` must be a finite number > 0"),
        ({"lora_alpha": math.nan}, "`lora_alpha` must be a finite number > 0"),
        ({"alpha_pattern": {"up": 0.0}}, r"`alpha_pattern\['up'\]` must be a finite number > 0"),
        ({"r": -2}, "`r` must be a positive int"),
        ({"rank_pattern": {"up": 0}}, r"`rank_pattern\['up'\]` must be a positive int"),
        ({"lora_dropout": math.nan}, r"`lora_dropout` must be in \[0, 1\)"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be in \[0, 1\)"),
    ],
)
def test_numbers_that_cannot_train_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


# --- adapter and config must belong together -----------------------------------------------------


@pytest.fixture
def trained():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up"], init_lora_weights=False)
    frozen, lora = jaxlora.split(_params(), config, KEY)
    return frozen, lora, config


@pytest.mark.parametrize("use_jit", [False, True])
def test_factor_rank_must_equal_the_configs_rank(trained, use_jit):
    frozen, lora, _ = trained
    other = LoraConfig(r=8, lora_alpha=16, target_modules=["up"])
    merge = jax.jit(jaxlora.merge, static_argnums=2) if use_jit else jaxlora.merge
    with pytest.raises(ValueError, match=r"factors at `up` have rank 4 but `config` gives rank 8"):
        merge(frozen, lora, other)
    patterned = LoraConfig(r=4, target_modules=["up"], rank_pattern={"up": 2})
    with pytest.raises(ValueError, match=r"rank 2 there \(`rank_pattern\['up'\]`\)"):
        jaxlora.unmerge(frozen, lora, patterned)
    with pytest.raises(ValueError, match="have rank 4 but `config` gives rank 8"):
        jaxlora.adapted_params(frozen, lora, other)  # the factored path checks the same


def test_a_module_the_config_does_not_target_is_an_error(trained):
    frozen, lora, _ = trained
    with pytest.raises(ValueError, match=r"`lora` adapts up, which `config` does not target"):
        jaxlora.merge(frozen, lora, LoraConfig(r=4, target_modules=["down"]))


@pytest.mark.parametrize("bad", [None, [1.0], "lora"])
def test_merge_without_an_adapter_is_a_type_error(trained, bad):
    frozen, _, config = trained
    with pytest.raises(TypeError, match="`lora` of `merge` must be the adapter"):
        jaxlora.merge(frozen, bad, config)


def test_factors_as_python_lists_name_the_leaf(trained):
    frozen, lora, config = trained
    listed = {"up": {"lora_a": np.asarray(lora["up"]["lora_a"]).tolist(), "lora_b": 0}}
    with pytest.raises(TypeError, match=r"`lora` leaf `up/lora_a` is a list.*jnp.asarray"):
        jaxlora.merge(frozen, listed, config)


def test_a_dict_config_says_to_build_a_lora_config():
    with pytest.raises(TypeError, match=r"`config` must be a jaxlora.LoraConfig \(in `split`\)"):
        jaxlora.split(_params(), {"r": 4, "target_modules": ["up"]}, KEY)


# --- count --------------------------------------------------------------------------------------


def test_count_rejects_another_models_adapter_and_non_array_leaves(trained):
    _, lora, _ = trained
    with pytest.raises(ValueError, match=r"factors at `up` do not fit `frozen`.*no kernel"):
        jaxlora.count({"x": {"kernel": jnp.ones((3, 3))}}, lora)
    wider = {"up": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}
    with pytest.raises(ValueError, match=r"factors at `up` do not fit `frozen`.*\(8, 6\)"):
        jaxlora.count(wider, {"up": {k: lora["up"][k] for k in ("lora_a", "lora_b")}})
    with pytest.raises(TypeError, match="`frozen` leaf `x/name` is a str, not an array"):
        jaxlora.count({"x": {"kernel": jnp.ones((3, 3)), "name": "abc"}})


def test_count_of_a_quantised_base_counts_its_parameters(trained):
    frozen, lora, config = trained
    quantised = jaxlora.quant.quantize(frozen, config, "int8")
    assert jaxlora.count(quantised, lora).total == jaxlora.count(frozen, lora).total


# --- optax freezing -----------------------------------------------------------------------------


def test_freeze_and_masks_name_the_mistake(trained):
    frozen, lora, config = trained
    with pytest.raises(ValueError, match="has no trainable leaf .* every update would be zero"):
        jaxlora.freeze(optax.sgd(0.1), config).init(frozen)
    misspelled = LoraConfig(target_modules=["up"], modules_to_save=["nrom"])
    with pytest.raises(ValueError, match=r"`modules_to_save` entries \['nrom'\] match no module"):
        jaxlora.trainable_mask(frozen, misspelled)
    with pytest.raises(TypeError, match=r"`config` must be a jaxlora.LoraConfig.*NoneType"):
        jaxlora.trainable_mask(frozen, None)
    with pytest.raises(TypeError, match="`optimizer` must be an optax GradientTransformation"):
        jaxlora.freeze("adam", config)


def test_freeze_update_with_grads_of_another_structure(trained):
    frozen, lora, config = trained
    combined = jaxlora.combine(frozen, lora)
    optimizer = jaxlora.freeze(optax.sgd(0.1, momentum=0.9), config)
    state = optimizer.init(combined)
    wrong = {"up": {"lora_a": jnp.ones((4, 4))}}
    with pytest.raises(ValueError, match="`updates` do not have the structure of `params`"):
        optimizer.update(wrong, state, combined)
    with pytest.raises(ValueError, match=r"`updates` given to `freeze\(...\).update`"):
        optimizer.update(wrong, state)
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, combined), state, combined)
    assert not jnp.any(updates["up"]["kernel"]) and jnp.all(updates["up"]["lora_a"] != 0)


# --- the rest of the API ------------------------------------------------------------------------


def test_other_obscure_messages_name_the_argument(trained):
    frozen, lora, config = trained
    both = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"])
    _, lora_both = jaxlora.split(frozen, both, KEY)
    with pytest.raises(ValueError, match=r"`adapters\[0\]`.*`down"):
        jaxlora.adapters.add_weighted(frozen, [(lora, both, 0.5), (lora_both, both, 0.5)])
    with pytest.raises(TypeError, match=r"`adapters\[0\]` must be a \(lora, config, weight\)"):
        jaxlora.adapters.add_weighted(frozen, [lora])
    with pytest.raises(ValueError, match=r"`a` \(3, 2\) and `b` \(4, 5\) do not pair up"):
        jaxlora.delta(jnp.ones((3, 2)), jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="`lora` must be a nested dict .* got None"):
        jaxlora.combine(frozen, None)
    with pytest.raises(ValueError, match="`stacked` has no array leaves"):
        jaxlora.adapters.unstack({})
    with pytest.raises(ValueError, match="share one leading"):
        jaxlora.adapters.unstack({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
    with pytest.raises(TypeError, match=r"Module instance, got function .* not its `apply`"):
        jaxlora.infer_layouts(lambda x: x, jnp.ones(3))
    with pytest.raises(TypeError, match="got a Module class"):
        jaxlora.infer_layouts(nn.Dense, jnp.ones(3))


# --- properties ---------------------------------------------------------------------------------

FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layouts")


def _tree():
    k = jax.random.split(KEY, 3)
    return {
        "enc": {
            "query": {"kernel": jax.random.normal(k[0], (4, 2, 3))},
            "value": {"kernel": jax.random.normal(k[1], (4, 6)), "bias": jnp.zeros(6)},
            "norm": {"scale": jnp.ones(4)},
            "ids": {"kernel": jnp.ones((4, 4), jnp.int32)},
        },
        "head": {"kernel": jax.random.normal(k[2], (6, 2))},
    }


NAMES = ["query", "value", "head", "norm", "ids", "enc", "qeury"]
configs = st.fixed_dictionaries(
    {
        "r": st.sampled_from([-1, 0, 1, 2]),
        "lora_alpha": st.sampled_from([0, -1, 0.5, 4, math.nan, math.inf]),
        "lora_dropout": st.sampled_from([0.0, 0.5, 1.0, -0.1]),
        "target_modules": st.one_of(
            st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True),
            st.sampled_from(["enc/.*", ".*(value|head)", "nothing", "all-linear"]),
        ),
        "exclude_modules": st.sampled_from([None, ["value"], ["nope"], "enc/v.*", "zz"]),
        "layouts": st.sampled_from([{}, {"query": "ioo"}, {"query": "oio"}, {"query": "io"},
                                    {"query": "sio"}, {"query": "xyz"}, {"nope": "io"}]),
        "init_lora_weights": st.just(False),
    }
)  # fmt: skip


def _names_a_field(message: str, fields) -> bool:
    return any(re.search(rf"`(?:LoraConfig\()?{f}\b", message) for f in fields)


@settings(max_examples=30, deadline=None)
@given(configs)
def test_any_config_works_and_round_trips_or_names_its_field(kwargs):
    params = _tree()
    try:
        config = LoraConfig(**kwargs)
        frozen, lora = jaxlora.split(params, config, KEY)
    except (ValueError, TypeError) as err:
        assert _names_a_field(str(err), FIELDS), str(err)
        return
    merged = jaxlora.merge(frozen, lora, config)
    back = jaxlora.unmerge(merged, lora, config)
    for path in ("enc/query/kernel", "enc/value/kernel", "head/kernel"):
        want = jaxlora_path(params, path)
        np.testing.assert_allclose(jaxlora_path(back, path), want, rtol=1e-5, atol=1e-5)
    assert jaxlora_path(merged, "enc/ids/kernel").dtype == jnp.int32


def jaxlora_path(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _mutations(lora):
    yield "drop b", {"value": {"lora_a": lora["value"]["lora_a"]}}
    yield "rank", {"value": {"lora_a": lora["value"]["lora_a"][:, :1],
                             "lora_b": lora["value"]["lora_b"][:1]}}  # fmt: skip
    yield "list", {"value": {**lora["value"], "lora_a": [[0.0]]}}
    yield "extra", {**lora, "other": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
    yield "none", None
    yield "shape", {"value": {"lora_a": jnp.ones((5, 2)), "lora_b": lora["value"]["lora_b"]}}


@settings(max_examples=14, deadline=None)
@given(st.integers(0, 5), st.sampled_from(["merge", "unmerge", "apply"]))
def test_any_broken_adapter_is_an_error_naming_lora(which, fn):
    frozen = {"value": {"kernel": jnp.ones((4, 6))}, "bias": jnp.zeros(6)}
    config = LoraConfig(r=2, target_modules=["value"])
    _, lora = jaxlora.split(frozen, config, KEY)
    name, broken = list(_mutations(lora))[which]
    call = {"merge": jaxlora.merge, "unmerge": jaxlora.unmerge, "apply": jaxlora.adapted_params}
    with pytest.raises((ValueError, TypeError)) as info:
        call[fn](frozen, broken, config)
    assert "`lora`" in str(info.value), (name, str(info.value))


# --- inputs the bad-input battery found accepted or obscure ----------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="down")(nn.relu(nn.Dense(6, name="up")(x)))


@pytest.fixture(scope="module")
def mlp():
    model, x = _MLP(), jnp.ones((3, 4))
    params = model.init(KEY, x)["params"]
    config = LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False)
    frozen, lora = jaxlora.split(params, config, KEY)
    return model, x, frozen, lora, config


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"task_type": "SEQ_CLASS"},
            ValueError,
            r"`task_type`='SEQ_CLASS'.*mean 'SEQ_CLS'",
        ),
        ({"dtype": None}, TypeError, r"`dtype` must name a floating dtype"),
    ],
)
def test_config_task_type_and_dtype_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_config_from_dict_and_json_name_the_problem():
    for data in ([1], None):
        with pytest.raises(TypeError, match=r"`data` of `LoraConfig.from_dict` must be a dict"):
            LoraConfig.from_dict(data)
    for text in ("{x", ""):
        with pytest.raises(ValueError, match=r"`text` of `LoraConfig.from_json` is not valid JSON"):
            LoraConfig.from_json(text)


@pytest.mark.parametrize("fn", [jaxlora.merge, jaxlora.unmerge])
def test_merge_rejects_adapters_that_cannot_be_right(mlp, fn):
    _, _, frozen, lora, config = mlp
    int_a = {**lora, "up": {**lora["up"], "lora_a": lora["up"]["lora_a"].astype(jnp.int32)}}
    with pytest.raises(TypeError, match=r"`lora` leaf `up/lora_a` has dtype int32"):
        fn(frozen, int_a, config)
    for no_factors in ({}, frozen):
        with pytest.raises(ValueError, match=r"holds no `lora_a` / `lora_b` factors"):
            fn(frozen, no_factors, config)
    with pytest.raises(ValueError, match=r"lacks the trainable copies .*`bias`='all'"):
        fn(frozen, lora, LoraConfig(r=2, target_modules=["up", "down"], bias="all"))
    with pytest.raises(TypeError, match=r"`(frozen|merged)` must be a params pytree"):
        fn("params", lora, config)


def test_apply_checks_its_keywords_and_the_model(mlp):
    model, x, frozen, lora, config = mlp
    run = lambda **kw: jaxlora.apply(model, frozen, lora, config, x, **kw)  # noqa: E731
    with pytest.raises(TypeError, match=r"`lora_deterministic` must be True, False or None"):
        run(lora_deterministic="yes")
    with pytest.raises(TypeError, match=r"`rngs\['dropout'\]` must be a PRNG key"):
        run(rngs={"dropout": 5})
    with pytest.raises(ValueError, match=r"`method`='nope' is not a method.*'__call__'"):
        run(method="nope")
    with pytest.raises(TypeError, match=r"`variables` must be a dict"):
        run(variables=5)
    graphdef, _ = nnx_split_other()
    with pytest.raises(ValueError, match=r"`frozen` does not fit the NNX `model`"):
        jaxlora.apply(graphdef, frozen, lora, config, x)


def nnx_split_other():
    from flax import nnx

    class Other(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.query(x)

    return nnx.split(Other(nnx.Rngs(0)))


def test_count_and_combine_check_the_adapter_fits(mlp):
    _, _, frozen, lora, _ = mlp
    with pytest.raises(ValueError, match=r"looks like the frozen base itself"):
        jaxlora.count(frozen, frozen)
    with pytest.raises(ValueError, match=r"`lora`.*(`frozen`|no counterpart)"):
        jaxlora.combine(lora, frozen)
    with pytest.raises(ValueError, match=r"`ghost"):
        jaxlora.combine(frozen, {**lora, "ghost": lora["up"]})


def test_partition_and_trainable_mask_name_combined(mlp):
    _, _, frozen, lora, config = mlp
    for fn in (jaxlora.partition, jaxlora.trainable_mask):
        with pytest.raises(TypeError, match=r"`combined` \(in `\w+`\) must be the combined"):
            fn(None, config)
        with pytest.raises(ValueError, match=r"`combined` \(in `\w+`\) holds no `lora_a`"):
            fn(frozen, config)
    other = {"query": {"kernel": jnp.ones((4, 4))}}
    other_config = LoraConfig(r=2, target_modules=["query"])
    combined = jaxlora.combine(*jaxlora.split(other, other_config, KEY))
    with pytest.raises(ValueError, match=r"`target_modules`"):
        jaxlora.partition(combined, config)


def test_find_targets_names_the_callers_argument():
    config = LoraConfig(target_modules=["up"])
    with pytest.raises(ValueError, match=r"`frozen` \(in `lora_shardings`\) holds no 'kernel'"):
        jaxlora.find_targets({"w": jnp.ones(3)}, config, argument="frozen", caller="lora_shardings")
    with pytest.raises(TypeError, match=r"`params` \(in `find_targets`\) must be the model's"):
        jaxlora.find_targets(None, config)


def test_pissa_names_a_quantised_kernel():
    base = {"up": {"kernel": jnp.ones((64, 64))}, "down": {"kernel": jnp.ones((64, 8))}}
    quantised = jaxlora.quant.quantize(base, ["up"], "nf4")
    with pytest.raises(ValueError, match=r"`params` kernels up/kernel are quantised"):
        jaxlora.inits.pissa_split(quantised, LoraConfig(r=2, target_modules=["up"]), KEY)
