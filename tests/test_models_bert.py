"""The BERT encoder with all-MiniLM-L6-v2 weights, checked against PyTorch reference values."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import jaxlora
from jaxlora.models import bert, data
from jaxlora.models.bert import weights as bert_weights

pytestmark = pytest.mark.slow  # MiniLM's pretrained weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")


@pytest.fixture(scope="module")
def minilm():
    return bert_weights.load_minilm()


@pytest.fixture(scope="module")
def reference():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


def _module_paths(params):
    return sorted({"/".join(k[:-1]) for k in traverse_util.flatten_dict(params)})


def test_config_is_minilm(minilm):
    config, _ = minilm
    assert config == bert.BertConfig()


def test_every_tensor_is_mapped(minilm):
    _, params = minilm
    state = load_file(os.path.join(bert_weights.minilm_dir(None), "model.safetensors"))
    flat = traverse_util.flatten_dict(params)
    used = set(state) - set(bert_weights.UNUSED_HF_TENSORS)
    assert len(flat) == len(used) == 101
    for name in used:
        module, _, leaf = name.rpartition(".")
        path = bert_weights.hf_to_flax_path(module)
        key = (*path.split("/"), bert_weights.flax_leaf(path, leaf))
        expected = state[name].T if key[-1] == "kernel" else state[name]
        np.testing.assert_array_equal(np.asarray(flat[key]), expected)
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_unmapped_and_missing_tensors_are_errors(minilm):
    config, params = minilm
    state = load_file(os.path.join(bert_weights.minilm_dir(None), "model.safetensors"))
    expected = jax.eval_shape(lambda: params)
    with pytest.raises(ValueError, match=r"not mapped onto the model: \['encoder.extra.weight'\]"):
        bert_weights.hf_state_dict_to_params(
            {**state, "encoder.extra.weight": np.zeros(3)}, expected
        )
    del state["encoder.layer.2.attention.self.value.bias"]
    with pytest.raises(ValueError, match=r"missing \['encoder/layer_2/attention/value/bias'\]"):
        bert_weights.hf_state_dict_to_params(state, expected)


@pytest.mark.parametrize("use_jit", [True, False])
def test_sentence_embeddings_match_pytorch(minilm, reference, use_jit):
    config, params = minilm
    tokenizer = bert_weights.load_minilm_tokenizer()
    sentences = reference["sentences"]
    ids, mask = data.encode_batch(tokenizer, [s["text"] for s in sentences], max_length=24)
    for row, sentence in enumerate(sentences):
        assert ids[row, : mask[row].sum()].tolist() == sentence["input_ids"]

    def embed(params, ids, mask):
        hidden = bert.BertEncoder(config).apply({"params": params}, ids, mask)
        return bert.mean_pool(hidden, mask), bert.mean_pool(hidden, mask, normalize=True)

    pooled, normalized = (jax.jit(embed) if use_jit else embed)(params, ids, mask)
    for row, sentence in enumerate(sentences):
        np.testing.assert_allclose(normalized[row, :8], sentence["first_dims"], atol=1e-4)
        np.testing.assert_allclose(jnp.linalg.norm(pooled[row]), sentence["pooled_norm"], atol=1e-4)
        following = normalized[(row + 1) % len(sentences)]
        np.testing.assert_allclose(
            normalized[row] @ following, sentence["cosine_to_next"], atol=1e-4
        )


def test_padding_does_not_change_embeddings(minilm):
    config, params = minilm
    tokenizer = bert_weights.load_minilm_tokenizer()
    model = bert.BertEncoder(config)
    short_ids, short_mask = data.encode_batch(tokenizer, ["a short one"], max_length=5)
    long_ids, long_mask = data.encode_batch(tokenizer, ["a short one"], max_length=16)
    forward = jax.jit(model.apply)  # eager forwards are checked in the PyTorch comparison
    short = bert.mean_pool(forward({"params": params}, short_ids, short_mask), short_mask)
    long = bert.mean_pool(forward({"params": params}, long_ids, long_mask), long_mask)
    np.testing.assert_allclose(short, long, atol=1e-5)


def test_query_value_targets_are_the_twelve_attention_kernels(minilm):
    _, params = minilm
    config = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    paths = sorted(t.path for t in jaxlora.find_targets(params, config))
    assert paths == sorted(
        f"encoder/layer_{i}/attention/{name}" for i in range(6) for name in ("query", "value")
    )


def test_classifier_takes_the_pretrained_encoder(minilm):
    config, encoder_params = minilm
    ids = jnp.ones((2, 7), jnp.int32)
    shapes = jax.eval_shape(bert.BertClassifier(config, num_labels=3).init, jax.random.key(0), ids)
    assert set(shapes["params"]) == {"bert", "classifier"}
    assert jax.tree.map(lambda x: x.shape, shapes["params"]["bert"]) == jax.tree.map(
        jnp.shape, encoder_params
    )
    assert shapes["params"]["classifier"]["kernel"].shape == (config.hidden_size, 3)


def test_classifier_logits_with_and_without_dropout():
    config = bert.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        hidden_dropout=0.5,
    )
    model = bert.BertClassifier(config, num_labels=3)
    ids, mask = jnp.ones((2, 7), jnp.int32), jnp.asarray([[1] * 7, [1] * 3 + [0] * 4], jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids, mask)["params"]

    @jax.jit
    def both(params):
        variables = {"params": params}
        rngs = {"dropout": jax.random.key(1)}
        return model.apply(variables, ids, mask), model.apply(
            variables, ids, mask, deterministic=False, rngs=rngs
        )

    clean, dropped = both(params)
    assert clean.shape == dropped.shape == (2, 3) and clean.dtype == jnp.float32
    assert not np.allclose(clean, dropped)


@pytest.mark.parametrize(
    ("flax_path", "hf_name"),
    [
        ("encoder/layer_0/attention/query", "encoder.layer.0.attention.self.query"),
        ("encoder/layer_5/attention/output", "encoder.layer.5.attention.output.dense"),
        ("encoder/layer_1/attention_layer_norm", "encoder.layer.1.attention.output.LayerNorm"),
        ("encoder/layer_3/intermediate", "encoder.layer.3.intermediate.dense"),
        ("encoder/layer_3/output", "encoder.layer.3.output.dense"),
        ("embeddings/layer_norm", "embeddings.LayerNorm"),
        ("bert/encoder/layer_0/attention/value", "bert.encoder.layer.0.attention.self.value"),
        ("bert/embeddings/word_embeddings", "bert.embeddings.word_embeddings"),
        ("classifier", "classifier"),
    ],
)
def test_name_map_examples(flax_path, hf_name):
    assert bert_weights.flax_to_hf_module(flax_path) == hf_name
    assert bert_weights.hf_to_flax_path(hf_name) == flax_path


def test_name_map_round_trips_every_module(minilm):
    config, params = minilm
    classifier = jax.eval_shape(
        bert.BertClassifier(config).init, jax.random.key(0), jnp.ones((1, 2), jnp.int32)
    )["params"]
    for path in _module_paths(params) + _module_paths(classifier):
        assert bert_weights.hf_to_flax_path(bert_weights.flax_to_hf_module(path)) == path


def test_name_map_errors():
    with pytest.raises(ValueError, match="`path` 'encoder/layer_0/attention/q' is not a BERT"):
        bert_weights.flax_to_hf_module("encoder/layer_0/attention/q")
    with pytest.raises(ValueError, match="`name` 'pooler.dense' is not a BERT module"):
        bert_weights.hf_to_flax_path("pooler.dense")


def test_config_errors():
    with pytest.raises(ValueError, match="`hidden_act` must be 'gelu', got 'relu'"):
        bert.BertConfig.from_hf({"hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"`hidden_size` \(10\) must be divisible"):
        bert.BertConfig(hidden_size=10, num_heads=3)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="safetensors file not found"):
        bert_weights.load_minilm(tmp_path)
