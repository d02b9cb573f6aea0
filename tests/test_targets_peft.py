"""Target selection checked against PEFT's own matching, on the same names and configs.

PEFT decides per PyTorch name (``model.layers.0.q``); jaxlora per Flax path (``model/layers/0/q``).
Every case below asks both and compares: the rule function, ``find_targets`` on a tree of those
modules, ``"all-linear"`` on tiny transformers models run through ``get_peft_model``, and the
``adapter_config.json`` import and export.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from jaxlora import LoraConfig, find_targets
from jaxlora._src.config import peft_layers, peft_rules
from jaxlora._src.config.targets import find_trainable_leaves
from jaxlora.peft import config_from_peft, peft_config

# The full suite only (imports torch, transformers and PEFT).
pytestmark = pytest.mark.slow

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")

WORDS = ("model", "layers", "layer", "h", "block", "attn", "q", "v", "mlp", "classifier", "dense")
PATTERNS = ("layers", "h", "block", "layer")
#: Regex templates, ``{s}`` the separator (``\.`` for PEFT, ``/`` for jaxlora).
REGEXES = (r".*{s}(q|v)", r"model{s}layers{s}[0-2]{s}.*", r"(?!.*classifier).*{s}dense", r"q")


def peft_matches(names, **options):
    """The dotted names PEFT's ``check_target_module_exists`` accepts."""
    config = peft.LoraConfig(**options)
    return [n for n in names if tuners_utils.check_target_module_exists(config, n)]


def ours(spec, options, path):
    fields = {k: v for k, v in options.items() if k != "target_modules"}
    return peft_rules.is_target(
        spec,
        path,
        exclude=fields.get("exclude_modules"),
        saved=fields.get("modules_to_save") or (),
        layers_to_transform=fields.get("layers_to_transform"),
        layers_pattern=fields.get("layers_pattern"),
    )


def tree_of(paths):
    """Nested dicts with a 4x4 kernel at every module path (a parent may hold one too)."""
    tree = {}
    for path in paths:
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["kernel"] = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    return tree


@st.composite
def cases(draw):
    segment = st.one_of(st.sampled_from(WORDS), st.sampled_from("0123"))
    names = draw(
        st.lists(st.lists(segment, min_size=1, max_size=6), min_size=1, max_size=8, unique_by=tuple)
    )
    dotted = [".".join(n) for n in names]
    options = {}
    if draw(st.booleans()):
        regex = draw(st.sampled_from(REGEXES))
        options["target_modules"] = regex.format(s=r"\.")
        slashed_spec = regex.format(s="/")
    else:
        suffixes = [".".join(n[-k:]) for n in names for k in range(1, len(n) + 1)]
        picked = draw(st.lists(st.sampled_from(suffixes + list(WORDS)), min_size=1, max_size=3))
        options["target_modules"] = picked
        slashed_spec = [p.replace(".", "/") for p in picked]
        layers = draw(
            st.one_of(
                st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=3)
            )
        )
        if layers is not None:
            options["layers_to_transform"] = layers
            pattern = draw(
                st.one_of(
                    st.none(),
                    st.sampled_from(PATTERNS),
                    st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2),
                )
            )
            if pattern is not None:
                options["layers_pattern"] = pattern
    if draw(st.booleans()):
        options["exclude_modules"] = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=2))
    if draw(st.booleans()):
        options["modules_to_save"] = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=2))
    return dotted, options, slashed_spec


@settings(max_examples=100, deadline=None)
@given(cases())
def test_rule_agrees_with_peft_on_generated_names(case):
    dotted, options, spec = case
    expected = set(peft_matches(dotted, **options))
    got = {n for n in dotted if ours(spec, options, n.replace(".", "/"))}
    assert got == expected, (options, dotted)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_find_targets_agrees_with_peft_on_generated_trees(case):
    dotted, options, spec = case
    excluded = options.get("exclude_modules") or ()
    slashed = [n.replace(".", "/") for n in dotted]
    if any(not any(p == e or p.endswith("/" + e) for p in slashed) for e in excluded):
        return  # jaxlora rejects an `exclude_modules` entry that names no module; PEFT ignores it
    config = LoraConfig(**{**options, "target_modules": spec})
    expected = sorted(n.replace(".", "/") for n in peft_matches(dotted, **options))
    # Unlike PEFT, jaxlora rejects a list entry that names no module even when another matches.
    typo = isinstance(spec, list) and any(
        not any(p == e or p.endswith("/" + e) for p in slashed) for e in spec
    )
    if not expected or typo:
        with pytest.raises(ValueError, match="no module matched `target_modules`"):
            find_targets(tree_of(slashed), config)
    else:
        assert sorted(t.path for t in find_targets(tree_of(slashed), config)) == expected


NAMES = [
    "model.embed_tokens",
    *(f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")),
    *(f"transformer.h.{i}.mlp.c_fc" for i in range(3)),
    "model.layers.1.experts.0.w1",
    "model.layers.2.experts.1.w1",
    "layers.0.q_proj",
    "classifier.dense",
    "classifier.out_proj",
    "roberta.encoder.layer.0.attention.self.dense",
    "lm_head",
]
CASES = {
    "suffix": {"target_modules": ["q_proj"]},
    "suffix needs a dot boundary": {"target_modules": ["proj"]},
    "multi-part suffix": {"target_modules": ["self_attn.v_proj", "mlp.c_fc"]},
    "whole name bypasses layers": {"target_modules": ["lm_head"], "layers_to_transform": 0},
    "regex full match": {"target_modules": r"model\.layers\.[01]\..*_proj"},
    "regex is not a search": {"target_modules": "q_proj"},
    "layers int": {"target_modules": ["q_proj", "c_fc"], "layers_to_transform": 1},
    "layers list": {"target_modules": ["q_proj", "c_fc"], "layers_to_transform": [0, 2]},
    "first index, not an expert's": {"target_modules": ["w1"], "layers_to_transform": [1]},
    "layers need a parent": {"target_modules": ["q_proj"], "layers_to_transform": [0]},
    "pattern string": {
        "target_modules": ["q_proj", "c_fc"],
        "layers_to_transform": [0],
        "layers_pattern": "h",
    },
    "pattern list": {
        "target_modules": ["q_proj", "c_fc"],
        "layers_to_transform": [1],
        "layers_pattern": ["layers", "h"],
    },
    "pattern at the start": {
        "target_modules": ["q_proj"],
        "layers_to_transform": [0],
        "layers_pattern": "layers",
    },
    "exclude list": {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]},
    "exclude regex": {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0\..*"},
    "saved wins over target": {"target_modules": ["dense"], "modules_to_save": ["classifier"]},
}


def slashed(spec):
    """A PEFT name rule in jaxlora's terms: ``.`` separators become ``/``."""
    if isinstance(spec, str):
        return spec.replace(r"\.", "/")
    return [s.replace(".", "/") for s in spec]


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_peft_test_suite_style_cases(options):
    ours_options = {**options}
    if "exclude_modules" in options:
        ours_options["exclude_modules"] = slashed(options["exclude_modules"])
    expected = peft_matches(NAMES, **options)
    got = [
        n
        for n in NAMES
        if ours(slashed(options["target_modules"]), ours_options, n.replace(".", "/"))
    ]
    assert got == expected


def test_linen_layer_names_have_an_index():
    # An extension PEFT has no need for: linen names list members `layers_3`, not `layers.3`.
    assert peft_layers.layer_index("layers_3/attn/query", None) == 3
    assert peft_layers.layer_index("encoder/block_1/mlp", "block") == 1
    assert peft_layers.layer_index("model/layers/2/blocks_5/q", None) == 2  # PEFT's reading first
    assert peft_layers.layer_index("attn/query", None) is None
    params = tree_of([f"layer_{i}/attn/{m}" for i in range(3) for m in ("query", "value")])
    config = LoraConfig(target_modules=["query"], layers_to_transform=[0, 2])
    assert [t.path for t in find_targets(params, config)] == [
        "layer_0/attn/query",
        "layer_2/attn/query",
    ]


# ---- "all-linear" on tiny transformers models, through PEFT's get_peft_model ----


def torch_tree(model):
    """The params tree of a torch model as Flax names it (Linear -> kernel (in, out))."""
    tree = {}
    for name, module in model.named_modules():
        node = tree
        for part in name.split(".") if name else ():
            node = node.setdefault(part, {})
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
            node["kernel"] = jax.ShapeDtypeStruct(shape, jnp.float32)
        elif isinstance(module, torch.nn.Embedding):
            shape = (module.num_embeddings, module.embedding_dim)
            node["embedding"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


def peft_all_linear(model, task_type):
    config = peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type)
    wrapped = peft.get_peft_model(model, config)
    base = wrapped.base_model.model
    return sorted(
        name.replace(".", "/")
        for name, module in base.named_modules()
        if isinstance(module, tuners_utils.BaseTunerLayer)
    )


def tiny(kind):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    small |= dict(intermediate_size=50, max_position_embeddings=64)
    if kind == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**small))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    if kind == "distilbert":
        config = transformers.DistilBertConfig(
            dim=16, hidden_dim=32, n_layers=2, n_heads=2, vocab_size=50
        )
        return transformers.DistilBertForMaskedLM(config)
    if kind == "bert_mlm":
        return transformers.BertForMaskedLM(transformers.BertConfig(**small))
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**small))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize(
    ("kind", "task_type", "head"),
    [
        ("gpt_neox", "CAUSAL_LM", "embed_out"),
        ("llama", "CAUSAL_LM", "lm_head"),
        ("distilbert", None, "vocab_projector"),
        ("bert_mlm", None, "cls/predictions/decoder"),
        ("roberta_cls", "SEQ_CLS", "classifier/out_proj"),
    ],
)
def test_all_linear_matches_peft_on_transformers_models(kind, task_type, head):
    torch.manual_seed(0)
    model = tiny(kind)
    params = torch_tree(model)
    expected = peft_all_linear(model, task_type)
    config = LoraConfig(target_modules="all-linear", task_type=task_type)
    got = sorted(t.path for t in find_targets(params, config))
    assert got == expected
    assert head not in got


def test_all_linear_head_by_shape_not_name():
    params = tree_of(["model/layers/0/mlp/up", "model/layers/0/mlp/down", "readout"])
    params["model"]["wte"] = {"embedding": jax.ShapeDtypeStruct((50, 4), jnp.float32)}
    params["readout"]["kernel"] = jax.ShapeDtypeStruct((4, 50), jnp.float32)
    params["model"]["layers"]["0"]["mlp"]["up"]["kernel"] = jax.ShapeDtypeStruct((4, 50), "f4")
    found = [t.path for t in find_targets(params, LoraConfig(target_modules="all-linear"))]
    assert found == ["model/layers/0/mlp/down", "model/layers/0/mlp/up"]
    # A head the rules miss is left out with `exclude_modules`.
    config = LoraConfig(target_modules="all-linear", exclude_modules=["down"])
    assert [t.path for t in find_targets(params, config)] == ["model/layers/0/mlp/up"]


@pytest.mark.parametrize(
    ("task_type", "heads"),
    [
        ("SEQ_CLS", ["classifier", "score"]),
        ("TOKEN_CLS", ["classifier", "score"]),
        ("QUESTION_ANS", ["qa_outputs"]),
        ("CAUSAL_LM", []),
    ],
)
def test_task_type_heads_are_saved_not_adapted(task_type, heads):
    params = tree_of(["encoder/dense", "classifier/dense", "score", "qa_outputs"])
    config = LoraConfig(target_modules=["dense", "score", "qa_outputs"], task_type=task_type)
    targets = find_targets(params, config)
    saved = {p.split("/")[0] for _, p in find_trainable_leaves(params, config, targets)}
    assert saved == set(heads)
    assert {t.path for t in targets}.isdisjoint(
        p for p in ("classifier/dense", "score", "qa_outputs") if p.split("/")[0] in heads
    )


# ---- split -> merge when a module is both targeted and saved ----

KEY = jax.random.key(0)


def params_of(tree):
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype) * 0.5, tree)


def test_split_merge_with_a_module_targeted_and_saved():
    params = params_of(tree_of(["encoder/dense", "classifier/dense", "classifier/out_proj"]))
    params["classifier"]["dense"]["bias"] = jnp.zeros(4)
    config = LoraConfig(r=2, target_modules=["dense"], modules_to_save=["classifier"])
    assert [t.path for t in find_targets(params, config)] == ["encoder/dense"]
    frozen, lora = jaxlora.split(params, config, KEY)
    lora = jax.tree.map(lambda x: x + 1.0, lora)  # a trained adapter: B and the copies moved
    merged = jaxlora.merge(frozen, lora, config)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(merged["classifier"]["dense"]["kernel"], 1.5)
    np.testing.assert_allclose(merged["classifier"]["dense"]["bias"], 1.0)
    assert not np.allclose(merged["encoder"]["dense"]["kernel"], 0.5)


def test_missing_task_head_is_no_error():
    params = tree_of(["encoder/dense"])
    config = LoraConfig(target_modules=["dense"], task_type="SEQ_CLS")
    targets = find_targets(params, config)
    assert [t.path for t in targets] == ["encoder/dense"]
    assert find_trainable_leaves(params, config, targets) == []


# ---- the new fields: validation, JSON, adapter_config.json ----


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers_to_transform": "1"}, TypeError, "`layers_to_transform` must be a layer index"),
        ({"layers_to_transform": [1.0]}, TypeError, "`layers_to_transform` must be a layer index"),
        ({"layers_to_transform": True}, TypeError, "`layers_to_transform` must be a layer index"),
        ({"layers_to_transform": -1}, ValueError, "`layers_to_transform` holds negative"),
        ({"layers_to_transform": []}, ValueError, "`layers_to_transform` is an empty list"),
        ({"layers_to_transform": 0, "layers_pattern": 3}, TypeError, "`layers_pattern` must be"),
        ({"layers_to_transform": 0, "layers_pattern": ""}, TypeError, "`layers_pattern` must be"),
        ({"layers_to_transform": 0, "layers_pattern": []}, TypeError, "`layers_pattern` must be"),
        ({"layers_to_transform": 0, "layers_pattern": ["("]}, ValueError, "not a valid regex"),
        ({"layers_pattern": "layers"}, ValueError, "`layers_pattern`='layers' is given without"),
        (
            {"target_modules": "all-linear", "layers_to_transform": 1},
            ValueError,
            "`layers_to_transform` cannot be used with `target_modules`='all-linear'",
        ),
        (
            {"target_modules": ".*q", "layers_to_transform": 1, "layers_pattern": "h"},
            ValueError,
            "`layers_to_transform` cannot be used",
        ),
    ],
)
def test_bad_layer_fields_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**{"target_modules": ["q"], **kwargs})


def test_layer_fields_round_trip_json():
    config = LoraConfig(target_modules=["q"], layers_to_transform=[0, 2], layers_pattern=["h"])
    assert config.layers_to_transform == (0, 2) and config.layers_pattern == ("h",)
    assert LoraConfig.from_json(config.to_json()) == config
    assert hash(config) == hash(LoraConfig.from_dict(config.to_dict()))
    single = LoraConfig(target_modules=["q"], layers_to_transform=1, layers_pattern="layers")
    assert LoraConfig.from_json(single.to_json()) == single


def test_adapter_config_with_layers_imports_and_exports():
    frozen = params_of(tree_of([f"model/layers/{i}/{m}" for i in range(3) for m in ("q", "v")]))
    document = {
        "r": 2,
        "target_modules": ["q", "v"],
        "layers_to_transform": [1, 2],
        "layers_pattern": "layers",
        "exclude_modules": ["v"],
    }
    config = config_from_peft(document, frozen)
    assert sorted(config.target_modules) == ["model/layers/1/q", "model/layers/2/q"]
    same = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[1, 2])
    assert [t.path for t in find_targets(frozen, same)] == sorted(config.target_modules)
    exported = peft_config(same, frozen)
    assert exported["layers_to_transform"] is None
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("q", "v")]
    options = {k: exported[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")}
    assert peft_matches(names, **options) == peft_matches(names, **document)


def test_adapter_config_all_linear_and_task_heads():
    frozen = params_of(tree_of(["model/layers/0/q", "classifier/dense", "lm_head"]))
    frozen["model"]["embed"] = {"embedding": jnp.ones((50, 4))}
    frozen["lm_head"]["kernel"] = jnp.ones((4, 50))
    config = config_from_peft({"target_modules": "ALL-LINEAR", "task_type": "SEQ_CLS"}, frozen)
    assert config.target_modules == ("model/layers/0/q",)
    assert config.modules_to_save == ("classifier",)
