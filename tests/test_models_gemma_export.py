"""Gemma 1/2/3 out to Hugging Face: merged LoRA checkpoints that transformers loads and runs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

import jaxlora
from jaxlora.models import gemma
from jaxlora.models.hf import export as hf_export
from jaxlora.models.hf import gemma as gemma_weights
from jaxlora.models.hf import gemma_export
from tests.test_models_gemma import checkpoint_dir, sample_ids, torch_logits, trained_adapter

pytestmark = pytest.mark.slow  # builds and runs PyTorch transformers models

ARCHITECTURES = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3"}
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
EVERY_LINEAR = jaxlora.LoraConfig(
    r=2, lora_alpha=4, target_modules=r".*(q|k|v|o|gate|up|down)_proj"
)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    return checkpoint_dir(request.param, tmp_path_factory)


def _read_tensors(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors |= load_file(os.path.join(directory, name))
    return tensors


def test_merged_export_runs_in_transformers(checkpoint, tmp_path):
    family, _, _, config, params = checkpoint
    frozen, lora = trained_adapter(params, EVERY_LINEAR)
    assert len(jaxlora.find_targets(params, EVERY_LINEAR)) == 7 * config.num_layers
    model = gemma.GemmaForCausalLM(config)
    ids = sample_ids()
    adapted = jax.jit(lambda lora: jaxlora.apply(model, frozen, lora, EVERY_LINEAR, ids))(lora)
    base = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert float(jnp.abs(adapted - base).max()) > 1e-3  # the adapter acts
    hf_export.save_hf_merged(tmp_path, config, frozen, lora, EVERY_LINEAR, max_shard_size="16KB")
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model-00002-of-" in " ".join(files)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert type(loaded).__name__ == f"{ARCHITECTURES[family]}ForCausalLM"
    assert loaded.config.model_type == MODEL_TYPES[family]
    np.testing.assert_allclose(torch_logits(loaded, ids), adapted, atol=1e-4, rtol=0)
    # And back: the exported directory reads as the same config.
    assert gemma_weights.load_hf_gemma(tmp_path)[0] == config


def test_save_then_load_gives_identical_params(checkpoint, tmp_path):
    _, _, directory, config, params = checkpoint
    hf_export.save_hf(tmp_path, config, params)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back_config, back = gemma_weights.load_hf_gemma(tmp_path)
    assert back_config == config
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # The very tensors transformers wrote: names, (out, in) layouts and norm weights as stored.
    ours, theirs = _read_tensors(tmp_path), _read_tensors(directory)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


def test_config_round_trip(checkpoint):
    _, model, _, config, _ = checkpoint
    document = gemma_export.config_to_hf(config)
    assert gemma_weights.config_from_hf(document) == config
    assert hf_export.config_to_hf(config) == document  # hf_export dispatches on the type
    reference = transformers.AutoConfig.for_model(**document)
    for key in ("num_hidden_layers", "head_dim", "vocab_size", "rope_parameters", "layer_types"):
        assert getattr(reference, key, None) == getattr(model.config, key, None), key


def test_untied_bfloat16_export_keeps_the_dtype(tmp_path_factory, tmp_path):
    # Gemma 2 with its own lm_head, loaded in bfloat16: the merged checkpoint stays bfloat16.
    _, _, _, config, params = checkpoint_dir("gemma2", tmp_path_factory)
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    rng = np.random.default_rng(3)
    head = rng.normal(size=(config.hidden_size, config.vocab_size)).astype(np.float32)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), {**params, "lm_head": {"kernel": head}})
    frozen, lora = trained_adapter(params, EVERY_LINEAR)
    hf_export.save_hf_merged(tmp_path, untied, frozen, lora, EVERY_LINEAR)
    stored = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert "lm_head.weight" in stored
    assert {str(t.dtype) for t in stored.values()} == {"bfloat16"}
    with open(os.path.join(tmp_path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    back_config, back = gemma_weights.load_hf_gemma(tmp_path)
    assert back_config == untied
    merged = jaxlora.merge(frozen, lora, EVERY_LINEAR)
    jax.tree.map(np.testing.assert_array_equal, back, merged)


# --- errors -------------------------------------------------------------------------------------


def test_other_configs_are_a_type_error(checkpoint, tmp_path):
    _, _, _, config, params = checkpoint
    frozen, lora = trained_adapter(params, EVERY_LINEAR)
    with pytest.raises(TypeError, match="`config` must be a LlamaConfig or a GemmaConfig"):
        hf_export.save_hf(tmp_path, dataclasses.asdict(config), params)
    with pytest.raises(TypeError, match="`config`.*BertConfig"):
        from jaxlora.models.bert import BertConfig

        hf_export.save_hf_merged(tmp_path, BertConfig(), frozen, lora, EVERY_LINEAR)
    with pytest.raises(TypeError, match="`config`"):
        hf_export.config_to_hf("gemma")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(qk_norm=True, sandwich_norms=False), "sandwich_norms"),
        (dict(sandwich_norms=False, final_logit_softcapping=3.0), "soft-capping"),
        (dict(sandwich_norms=True, rope_local_theta=10.0), "local RoPE"),
        (dict(sandwich_norms=True, qk_norm=True, rope_factor=2.0), "rope_local_factor"),
    ],
)
def test_configs_no_generation_has_are_refused(changes, match, tmp_path):
    config = dataclasses.replace(gemma.GemmaConfig(num_layers=1), **changes)
    with pytest.raises(ValueError, match=match):
        gemma_export.config_to_hf(config)
    with pytest.raises(ValueError, match=match):
        hf_export.save_hf(tmp_path, config, {})
    assert not os.listdir(tmp_path)


def test_bad_gemma_params_and_hf_config_are_named(tmp_path_factory, tmp_path):
    _, _, directory, config, params = checkpoint_dir("gemma3", tmp_path_factory)
    broken = {**params, "layers_1": {**params["layers_1"], "pre_feedforward_layernorm": {}}}
    with pytest.raises(ValueError, match=r"missing \['layers_1/pre_feedforward_layernorm/scale"):
        hf_export.save_hf(tmp_path, config, broken)
    with pytest.raises(ValueError, match="`hf_config` describes"):
        wrong = {**gemma_export.config_to_hf(config), "sliding_window": 5}
        hf_export.save_hf(tmp_path, config, params, hf_config=wrong)
    assert not os.listdir(tmp_path)
    # The base's own config.json is accepted and written (with the dtype) in place of ours.
    document = transformers.AutoConfig.from_pretrained(directory).to_dict()
    hf_export.save_hf(tmp_path, config, params, hf_config=document)
    assert gemma_weights.load_hf_gemma(tmp_path)[0] == config
