"""PEFT adapter format: exports load in real PEFT, PEFT adapters load here, bad files are errors.

torch, transformers and peft are required test dependencies (the `torch` extra, part of `dev`):
a missing install fails here rather than skipping the interop proof.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxlora
from jaxlora import peft as jpeft
from tests import peft_models as pm
from tests.treeutil import assert_trees_bitwise_equal, perturbed

pytestmark = pytest.mark.slow  # PyTorch and PEFT

TARGETS = ["embed", "blocks/fc", "proj", "conv"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = pm.TorchNet().eval()
    return model, pm.flax_params(model), pm.inputs()


@pytest.mark.parametrize(("use_rslora", "bias"), [(False, "lora_only"), (True, "all")])
def test_export_loads_in_peft_with_equal_logits(tmp_path, tiny, use_rslora, bias):
    model, params, (ids, image) = tiny
    config = pm.lora_config(TARGETS, use_rslora=use_rslora, bias=bias)
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    lora = perturbed(lora, 2)
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    ours = pm.flax_logits(jaxlora.merge(frozen, lora, config), ids, image)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    theirs = pm.torch_logits(peft_model.eval(), ids, image)
    base = pm.torch_logits(model, ids, image)
    diff = np.abs(ours - theirs).max()
    print(f"export, rslora={use_rslora}, bias={bias}: max |logit diff| {diff:.3g}")
    assert np.abs(ours - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_exported_config_follows_peft_conventions(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(TARGETS, task_type="FEATURE_EXTRACTION")
    _, lora = jaxlora.split(params, config, jax.random.key(1))
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    with open(tmp_path / "adapter_config.json") as f:
        document = json.load(f)
    assert document["peft_type"] == "LORA" and document["task_type"] == "FEATURE_EXTRACTION"
    assert (document["r"], document["lora_alpha"], document["use_rslora"]) == (4, 8, False)
    assert document["target_modules"] == ["blocks.0.fc", "blocks.1.fc", "conv", "embed", "proj"]
    assert document["rank_pattern"] == {"proj": 2} and document["alpha_pattern"] == {"conv": 4.0}
    assert document["modules_to_save"] == ["norm"]
    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    p = "base_model.model."
    assert shapes[p + "blocks.1.fc.lora_A.weight"] == (4, pm.DIM)
    assert shapes[p + "blocks.1.fc.lora_B.weight"] == (pm.DIM, 4)
    assert shapes[p + "blocks.1.fc.base_layer.bias"] == (pm.DIM,)
    assert shapes[p + "proj.lora_A.weight"] == (2, pm.DIM)
    assert shapes[p + "proj.lora_B.weight"] == (6, 2)
    assert shapes[p + "embed.lora_embedding_A"] == (4, pm.VOCAB)
    assert shapes[p + "embed.lora_embedding_B"] == (pm.DIM, 4)
    assert shapes[p + "conv.lora_A.weight"] == (4, 3, 3, 3)
    assert shapes[p + "conv.lora_B.weight"] == (pm.CHANNELS, 4, 1, 1)
    assert shapes[p + "norm.weight"] == (pm.DIM,) and shapes[p + "norm.bias"] == (pm.DIM,)
    assert len(shapes) == 2 * 5 + 4 + 2  # factors, biases of conv/proj/fc x2, norm


def test_peft_made_adapter_loads_with_equal_logits(tmp_path, tiny):
    _, params, (ids, image) = tiny
    peft_model = pm.peft_made(tmp_path, copy.deepcopy(tiny[0]))
    lora, config = jpeft.load_peft(tmp_path, params, module_name=pm.module_name, layouts=pm.LAYOUTS)
    assert config.target_modules == ("blocks/fc", "conv", "embed", "proj")
    assert config.rank_pattern == {"proj": 2} and config.alpha_pattern == {"conv": 4}
    assert config.modules_to_save == ("norm",) and config.bias == "lora_only"
    ours = pm.flax_logits(jaxlora.merge(params, lora, config), ids, image)
    theirs = pm.torch_logits(peft_model, ids, image)
    print(f"import: max |logit diff| {np.abs(ours - theirs).max():.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_round_trip_is_exact(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(5))
    lora = perturbed(lora, 6)
    abstract = jax.eval_shape(lambda: params)
    jpeft.save_peft(tmp_path, lora, config, abstract, module_name=pm.module_name)
    back, back_config = jpeft.load_peft(
        tmp_path, abstract, module_name=pm.module_name, layouts=pm.LAYOUTS
    )
    assert_trees_bitwise_equal(back, lora)
    assert [(t.path, t.rank, t.scale) for t in jaxlora.find_targets(params, back_config)] == [
        (t.path, t.rank, t.scale) for t in jaxlora.find_targets(params, config)
    ]


# --- a real model: BERT from a random transformers.BertConfig --------------------------------


@pytest.fixture(scope="module")
def bert():
    from jaxlora.models import bert as flax_bert
    from jaxlora.models.bert import weights as bert_weights

    hf_config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    encoder = flax_bert.BertEncoder(flax_bert.BertConfig.from_hf(hf_config.to_dict()))
    ids = np.random.default_rng(0).integers(0, 64, (2, 7)).astype(np.int32)
    expected = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.asarray(ids))["params"])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = bert_weights.hf_state_dict_to_params(state, expected)

    def name(path, index):
        return bert_weights.flax_to_hf_module(path)

    def run_flax(p):
        return np.asarray(encoder.apply({"params": p}, jnp.asarray(ids)))

    def run_torch(m):
        with torch.no_grad():
            return m(torch.from_numpy(ids).long()).last_hidden_state.numpy()

    return hf_config, model, params, name, run_flax, run_torch


def test_bert_export_and_import_match_peft(tmp_path, bert):
    hf_config, model, params, name, run_flax, run_torch = bert
    config = jaxlora.LoraConfig(
        r=4,
        target_modules=["query", "value", "word_embeddings"],
        rank_pattern={"layer_1/attention/query": 2},
        bias="lora_only",
        modules_to_save=["embeddings/layer_norm"],
        init_lora_weights=False,
    )
    frozen, lora = jaxlora.split(params, config, jax.random.key(1))
    lora = perturbed(lora, 2)
    jpeft.save_peft(tmp_path / "out", lora, config, params, module_name=name)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    out_diff = np.abs(run_flax(jaxlora.merge(frozen, lora, config)) - run_torch(loaded)).max()

    made = pm.peft_made(
        tmp_path / "in",
        loaded.merge_and_unload(),
        target_modules=["query", "value"],
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=None,
    )
    base = jaxlora.merge(frozen, lora, config)
    theirs_lora, theirs_config = jpeft.load_peft(tmp_path / "in", base, module_name=name)
    in_diff = np.abs(run_flax(jaxlora.merge(base, theirs_lora, theirs_config)) - run_torch(made))
    print(f"BERT: export max |diff| {out_diff:.3g}, import max |diff| {in_diff.max():.3g}")
    assert out_diff <= 1e-5 and in_diff.max() <= 1e-5


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(1))
    jpeft.save_peft(tmp_path, lora, config, params, module_name=pm.module_name)
    return tmp_path, params


KEY = "base_model.model.proj.lora_A.weight"


def test_missing_key_is_an_error(exported):
    directory, params = exported
    pm.rewrite(directory, lambda t: t.pop(KEY))
    with pytest.raises(ValueError, match=rf"does not fit `frozen`: missing keys {KEY}"):
        pm.load(directory, params)


def test_unexpected_key_is_an_error(exported):
    directory, params = exported
    pm.rewrite(directory, lambda t: t.update({"base_model.model.nowhere.lora_A.weight": t[KEY]}))
    with pytest.raises(ValueError, match=r"unexpected keys base_model\.model\.nowhere\.lora_A"):
        pm.load(directory, params)


def test_misshaped_key_is_an_error(exported):
    directory, params = exported
    pm.rewrite(directory, lambda t: t.update({KEY: np.zeros((3, pm.DIM), np.float32)}))
    with pytest.raises(
        ValueError, match=rf"mis-shaped keys `{KEY}` \(3, 8\) \(expected \(2, 8\)\)"
    ):
        pm.load(directory, params)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(peft_type="LOHA"), "`peft_type`='LOHA'; only 'LORA' is read"),
        (
            lambda d: d.update(fan_in_fan_out=True),
            r"options jaxlora cannot represent: \{'fan_in_fan_out': True\}",
        ),
        (lambda d: d.update(init_lora_weights="pissa"), "'pissa', which changes the base weights"),
        (lambda d: d.update(target_modules=["nothing"]), r"\['nothing'\], which matches no module"),
        (
            lambda d: d.update(target_modules=["blocks.0.fc"]),
            "adapts only some layers of the stacked module `blocks/fc`",
        ),
        (
            lambda d: d.update(rank_pattern={"blocks.1.fc": 2}),
            r"layers of the stacked module `blocks/fc` different ranks \[2, 4\]",
        ),
    ],
)
def test_unsupported_or_inconsistent_configs_are_errors(exported, edit, match):
    directory, params = exported
    pm.rewrite(directory, edit_config=edit)
    with pytest.raises(ValueError, match=match):
        pm.load(directory, params)


def test_export_errors(tmp_path, tiny):
    _, params, _ = tiny
    config = pm.lora_config(TARGETS)
    _, lora = jaxlora.split(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match=r"the stacked module `blocks/fc` needs a PyTorch name"):
        jpeft.save_peft(tmp_path, lora, config, params)
    with pytest.raises(
        ValueError,
        match=r"`module_name` gave None for the module `blocks/fc` \(layer index \(0,\)\)",
    ):
        jpeft.save_peft(tmp_path, lora, config, params, module_name=lambda p, i: None)
    with pytest.raises(ValueError, match="maps two leaves to the PEFT key `base_model.model.x"):
        jpeft.save_peft(tmp_path, lora, config, params, module_name=lambda p, i: "x")
    small = {**params, "proj": {**params["proj"], "kernel": jnp.zeros((pm.DIM, 2, 4))}}
    with pytest.raises(ValueError, match=r"`lora` does not fit `frozen`: `proj/lora_b` stored"):
        jpeft.save_peft(tmp_path, lora, config, small, module_name=pm.module_name)


def test_layouts_peft_cannot_express_are_errors(tmp_path):
    conv = {"conv": {"kernel": jnp.zeros((3, 2, 4, 5))}}
    config = jaxlora.LoraConfig(r=2, target_modules=["conv"], layouts={"conv": "wiio"})
    _, lora = jaxlora.split(conv, config, jax.random.key(0))
    with pytest.raises(ValueError, match="PEFT's conv LoRA needs one input and one output axis"):
        jpeft.save_peft(tmp_path, lora, config, conv)
    saved = {"q": {"kernel": jnp.zeros((4, 4))}, "h": {"kernel": jnp.zeros((4, 2, 2))}}
    config = jaxlora.LoraConfig(r=2, target_modules=["q"], modules_to_save=["h"])
    _, lora = jaxlora.split(saved, config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"axes of the kernel `h/kernel` \(4, 2, 2\) to save"):
        jpeft.save_peft(tmp_path, lora, config, saved)


def test_non_unique_names_become_exact_patterns():
    base = {
        "a": {"q": {"kernel": jnp.zeros((4, 4))}},
        "b": {"a": {"q": {"kernel": jnp.zeros((4, 4))}}},
    }
    config = jaxlora.LoraConfig(r=4, target_modules="a/q", rank_pattern={"^a/q": 2})
    document = jpeft.peft_config(config, base)
    assert document["target_modules"] == r"(?:a\.q)"
    assert document["rank_pattern"] == {r"^a\.q": 2}
