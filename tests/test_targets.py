import jax
import jax.numpy as jnp
import pytest

import jaxlora
from jaxlora import LoraConfig, find_targets, infer_layouts
from tests import linen_models as lm


def _abstract(model):
    """The model, its params as shapes (targets need no values: nothing is initialised), layouts."""
    params = jax.eval_shape(lambda: lm.init(model, lm.ids()))
    return model, params, infer_layouts(model, lm.ids())


@pytest.fixture(scope="module")
def unrolled():
    return _abstract(lm.Decoder())


@pytest.fixture(scope="module")
def scanned():
    return _abstract(lm.Decoder(scan=True))


def paths_of(params, **kwargs):
    return [t.path for t in find_targets(params, LoraConfig(**kwargs))]


@pytest.mark.slow
def test_infer_layouts_reads_attention_and_scan(unrolled, scanned):
    _, _, layouts = unrolled
    assert layouts["layer_0/attn/query"] == "ioo"
    assert layouts["layer_0/attn/out"] == "iio"
    assert layouts["layer_0/fc1"] == "io"
    assert layouts["embed"] == "io"
    _, _, layouts = scanned
    assert layouts["layers/attn/key"] == "sioo"
    assert layouts["layers/attn/out"] == "siio"
    assert layouts["layers/fc2"] == "sio"


def test_infer_layouts_conv():
    layouts = infer_layouts(lm.ConvNet(), lm.images())
    assert layouts == {"conv1": "wwio", "conv2": "wwio", "head": "io"}


def test_infer_layouts_names_a_method_the_model_lacks():
    with pytest.raises(ValueError, match=r"`method`=.nope. is not a method of .*ConvNet"):
        infer_layouts(lm.ConvNet(), lm.images(), method="nope")


def test_suffix_matching(unrolled):
    _, params, layouts = unrolled
    found = paths_of(params, target_modules=["query", "value"], layouts=layouts)
    assert found == [f"layer_{i}/attn/{m}" for i in range(3) for m in ("query", "value")]
    # A suffix must start at a "/" boundary: "uery" is not "query".
    with pytest.raises(ValueError, match="no module matched"):
        paths_of(params, target_modules=["uery"], layouts=layouts)


def test_regex_full_match(unrolled):
    _, params, layouts = unrolled
    found = paths_of(params, target_modules=r"layer_[01]/attn/(query|key)", layouts=layouts)
    assert found == [
        "layer_0/attn/key",
        "layer_0/attn/query",
        "layer_1/attn/key",
        "layer_1/attn/query",
    ]
    # Full match, not search: a bare "query" regex matches no full path.
    with pytest.raises(ValueError, match="no module matched"):
        paths_of(params, target_modules="query", layouts=layouts)


def test_all_linear_skips_head_and_embeddings(unrolled):
    _, params, layouts = unrolled
    found = paths_of(params, target_modules="all-linear", layouts=layouts)
    assert "lm_head" not in found and "embed" not in found
    assert len(found) == 3 * 6  # q, k, v, out, fc1, fc2 per layer


@pytest.mark.slow
def test_all_linear_skips_conv_and_modules_to_save():
    params = lm.init(lm.ConvNet(), lm.images())
    layouts = infer_layouts(lm.ConvNet(), lm.images())
    # As PEFT: without an output embedding or a task head, a dense "head" is a linear like others.
    assert paths_of(params, target_modules="all-linear", layouts=layouts) == ["head"]
    with pytest.raises(ValueError, match="no module matched `target_modules`='all-linear'"):
        paths_of(params, target_modules="all-linear", modules_to_save=["head"], layouts=layouts)
    found = paths_of(params, target_modules=["conv1", "conv2"], layouts=layouts)
    assert found == ["conv1", "conv2"]


def test_exclude_modules(unrolled):
    _, params, layouts = unrolled
    found = paths_of(
        params, target_modules="all-linear", exclude_modules=["out", "fc2"], layouts=layouts
    )
    assert not any(p.endswith(("/out", "/fc2")) for p in found) and len(found) == 12
    found = paths_of(
        params, target_modules="all-linear", exclude_modules=".*layer_[12].*", layouts=layouts
    )
    assert all(p.startswith("layer_0/") for p in found)


def test_scanned_stack_targets(scanned):
    _, params, layouts = scanned
    targets = find_targets(
        params, LoraConfig(r=4, target_modules=["query", "out"], layouts=layouts)
    )
    by_path = {t.path: t for t in targets}
    assert by_path["layers/attn/query"].a_shape == (3, 16, 4)
    assert by_path["layers/attn/query"].b_shape == (3, 4, 2, 8)
    assert by_path["layers/attn/out"].a_shape == (3, 2, 8, 4)
    assert by_path["layers/attn/out"].b_shape == (3, 4, 16)


def test_rank_and_alpha_patterns(unrolled):
    _, params, layouts = unrolled
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        rank_pattern={"layer_0/attn/query": 2},
        alpha_pattern={"value": 4},
        layouts=layouts,
    )
    targets = {t.path: t for t in find_targets(params, config)}
    assert targets["layer_0/attn/query"].rank == 2
    assert targets["layer_0/attn/query"].scale == 8.0
    assert targets["layer_1/attn/query"].rank == 8
    assert targets["layer_1/attn/value"].scale == 0.5


def test_embedding_and_conv_kinds(unrolled):
    _, params, _ = unrolled
    (target,) = find_targets(params, LoraConfig(r=3, target_modules=["embed"]))
    assert target.kind == "embed" and target.a_shape == (32, 3) and target.b_shape == (3, 16)
    conv_params = lm.init(lm.ConvNet(), lm.images())
    config = LoraConfig(r=2, target_modules=["conv1"], layouts={"conv1": "wwio"})
    (target,) = find_targets(conv_params, config)
    assert target.kind == "conv" and target.fan_in == 27
    assert target.a_shape == (3, 3, 3, 2) and target.b_shape == (2, 8)


def test_nnx_state_targets():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(4, 6, rngs=rngs)
            self.value = nnx.Linear(4, 6, rngs=rngs)

    _, state = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    config = LoraConfig(r=2, target_modules=["query"])
    (target,) = find_targets(state, config)
    assert target.path == "query" and target.shape == (4, 6)
    frozen, lora = jaxlora.split(state, config, jax.random.key(0))
    merged = jaxlora.merge(frozen, lora, config)
    assert type(merged) is type(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": None}, "`target_modules` is None"),
        (
            {"target_modules": ["nope"]},
            r"no module matched `target_modules`=\('nope',\); modules seen: embed",
        ),
        ({"target_modules": ["fc1"], "exclude_modules": ["fc1"]}, "after `exclude_modules`"),
        (
            {"target_modules": ["fc1"], "exclude_modules": ["fc9"]},
            r"`exclude_modules` entries \['fc9'\] match no module",
        ),
        (
            {"target_modules": ["query"]},
            "cannot tell the input and output axes .* `layer_0/attn/query` \\(16, 2, 8\\)",
        ),
        (
            {"target_modules": ["fc1"], "rank_pattern": {"fc2": 2}},
            "`rank_pattern` key 'fc2' matches no target module",
        ),
        (
            {"target_modules": ["fc1"], "alpha_pattern": {"query": 2}},
            "`alpha_pattern` key 'query' matches no target",
        ),
        (
            {"target_modules": ["fc1"], "layouts": {"nothing": "io"}},
            "`layouts` key 'nothing' matches no module",
        ),
        (
            {"target_modules": ["fc1"], "layouts": {"fc1": "iio"}},
            "has 3 axes but the kernel at `layer_0/fc1` has shape",
        ),
        ({"target_modules": ["embed"], "layouts": {"embed": "ii"}}, "must be a layout string"),
        (
            {"target_modules": ["fc1"], "modules_to_save": ["fc1"]},
            r"no module matched .*`modules_to_save` .* takes layer_0/fc1",
        ),
        (
            {"target_modules": ["fc1"], "modules_to_save": ["classifier"]},
            r"`modules_to_save` entries \['classifier'\] match no module",
        ),
    ],
)
def test_matching_errors(unrolled, kwargs, match):
    _, params, _ = unrolled
    with pytest.raises(ValueError, match=match):
        jaxlora.split(params, LoraConfig(**kwargs), jax.random.key(0))


def test_params_without_kernels_is_an_error():
    with pytest.raises(ValueError, match="holds no 'kernel', 'embedding' or 'weight' leaf"):
        find_targets({"params": {"w": jnp.ones((2, 2))}}, LoraConfig(target_modules=["w"]))


def test_module_paths_lists_candidates(unrolled):
    _, params, _ = unrolled
    assert "layer_2/fc2" in jaxlora.module_paths(params)
