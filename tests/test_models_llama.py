"""The Llama decoder with SmolLM2-135M-Instruct weights, checked against PyTorch references."""

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxlora
from jaxlora.models import llama
from jaxlora.models.io.gguf_reader import GGUFFile
from jaxlora.models.llama import weights as llama_weights

pytestmark = pytest.mark.slow  # SmolLM2's pretrained weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_reference.json")
TINY = llama.LlamaConfig(
    vocab_size=12,
    hidden_size=8,
    intermediate_size=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=2 * 2,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def smollm2():
    return llama_weights.load_smollm2()


@pytest.fixture(scope="module")
def tokenizer():
    return llama_weights.load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny_params():
    # One jitted init: op-by-op initialisation compiles a kernel per parameter and is slow.
    init = jax.jit(llama.LlamaForCausalLM(TINY).init)
    return init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]


@pytest.fixture(scope="module")
def reference():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)["cases"]


@pytest.fixture(scope="module")
def last_logits(smollm2, tokenizer, reference):
    """case -> SmolLM2's logits at the last token of its prompt, from ONE compiled forward over
    all the prompts, right-padded to one length (compiling the 30 unrolled blocks costs seconds per
    length; causal attention keeps the padding after a prompt invisible to it, see
    :func:`test_attention_is_causal_and_respects_the_mask`)."""
    config, params = smollm2
    ids = {case: tokenizer.encode(ref["prompt"]).ids for case, ref in reference.items()}
    length = max(len(row) for row in ids.values())
    batch = np.zeros((len(ids), length), np.int32)
    for row, prompt in zip(batch, ids.values(), strict=True):
        row[: len(prompt)] = prompt
    logits = jax.jit(llama.LlamaForCausalLM(config).apply)({"params": params}, batch)
    return {
        case: np.asarray(logits[row, len(prompt) - 1])
        for row, (case, prompt) in enumerate(ids.items())
    }


def test_every_tensor_is_mapped(smollm2):
    config, params = smollm2
    assert config == llama.LlamaConfig()
    flat = traverse_util.flatten_dict(params)
    assert len(flat) == len(GGUFFile(llama_weights.smollm2_path()).tensor_names) == 272
    assert flat[("embed_tokens", "embedding")].shape == (49152, 576)
    assert flat[("layers_29", "self_attn", "k_proj", "kernel")].shape == (576, 192)
    assert flat[("layers_0", "mlp", "down_proj", "kernel")].shape == (1536, 576)
    assert all(v.dtype == jnp.float32 for v in flat.values())


@pytest.mark.parametrize("case", ["completion", "chat_question"])
def test_tokenizer_and_logits_match_pytorch(tokenizer, reference, last_logits, case):
    expected = reference[case]
    ids = tokenizer.encode(expected["prompt"]).ids
    assert ids == expected["input_ids"]
    last = last_logits[case]
    np.testing.assert_allclose(
        last[expected["last_top_ids"]], expected["last_top_logits"], atol=1e-3
    )
    assert int(last.argmax()) == expected["last_top_ids"][0]


def test_greedy_completion_says_paris(smollm2, tokenizer, reference):
    config, params = smollm2
    prompt = tokenizer.encode("The capital of France is").ids
    new = llama.generate(params, config, prompt, max_new_tokens=3)
    text = tokenizer.decode(np.asarray(new).tolist())
    assert text.startswith(" Paris"), text
    assert new.tolist() == reference["completion"]["greedy_ids"][:3]


def test_greedy_chat_answer_says_paris_and_stops(smollm2, tokenizer, reference):
    config, params = smollm2
    prompt = tokenizer.encode(llama_weights.chat_prompt("What is the capital of France?")).ids
    # One row, as a (batch, length) prompt: a second copy of the same row proves nothing more.
    new = np.asarray(llama.generate(params, config, np.asarray([prompt]), 9))
    assert new.shape == (1, 9)
    assert new[0].tolist()[:8] == reference["chat_question"]["greedy_ids"]
    assert new[0, -1] == config.eos_token_id  # rows stay at EOS once they emit it
    answer = tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    assert answer == "The capital of France is Paris."


def test_gguf_and_hf_rope_layouts_agree(tiny_params):
    model = llama.LlamaForCausalLM(TINY)
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    params = tiny_params

    def to_hf(path, x):
        name = path[-2].key
        if name not in ("q_proj", "k_proj"):
            return x
        heads = TINY.num_heads if name == "q_proj" else TINY.num_kv_heads
        return llama_weights.gguf_rows_to_hf(np.asarray(x).T, heads).T

    hf_params = jax.tree.map_with_path(to_hf, params)
    hf_model = llama.LlamaForCausalLM(
        llama.LlamaConfig(**{**TINY.__dict__, "rope_interleaved": False})
    )
    np.testing.assert_allclose(
        jax.jit(model.apply)({"params": params}, ids),
        jax.jit(hf_model.apply)({"params": hf_params}, ids),
        atol=1e-5,
    )


def test_attention_is_causal_and_respects_the_mask(tiny_params):
    apply = jax.jit(llama.LlamaForCausalLM(TINY).apply)  # op by op, each call compiles for seconds
    ids = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    params = tiny_params
    full = apply({"params": params}, ids)
    changed_tail = apply({"params": params}, ids.at[0, 4].set(7))
    np.testing.assert_allclose(full[:, :4], changed_tail[:, :4], atol=1e-6)
    masked = apply(
        {"params": params},
        ids,
        jnp.asarray([[0, 1, 1, 1, 1]], jnp.int32),
        jnp.asarray([[0, 0, 1, 2, 3]], jnp.int32),
    )
    np.testing.assert_allclose(masked[:, 1:], apply({"params": params}, ids[:, 1:]), atol=1e-5)


def test_lora_targets_select_the_projections(smollm2):
    _, params = smollm2
    config = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    paths = [t.path for t in jaxlora.find_targets(params, config)]
    assert len(paths) == 60
    assert "layers_0/self_attn/q_proj" in paths and "layers_29/self_attn/v_proj" in paths


def _write_tiny_gguf(path, params, extra_tensor=False):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY.num_layers)
    writer.add_embedding_length(TINY.hidden_size)
    writer.add_feed_forward_length(TINY.intermediate_size)
    writer.add_head_count(TINY.num_heads)
    writer.add_head_count_kv(TINY.num_kv_heads)
    writer.add_key_length(TINY.head_dim)
    writer.add_value_length(TINY.head_dim)
    writer.add_layer_norm_rms_eps(TINY.rms_norm_eps)
    writer.add_rope_freq_base(TINY.rope_theta)
    writer.add_context_length(TINY.max_position_embeddings)
    writer.add_token_list([f"t{i}" for i in range(TINY.vocab_size)])
    # Written with the loader's own name table: this checks the plumbing (every tensor read back,
    # config from metadata); the real-model tests check the table itself against PyTorch.
    block = {flax: name for name, flax in llama_weights.GGUF_BLOCK_NAMES.items()}
    top = {flax: name for name, flax in llama_weights.GGUF_TOP_NAMES.items()}
    for key, value in traverse_util.flatten_dict(params).items():
        if key[0].startswith("layers_"):
            name = f"blk.{key[0].removeprefix('layers_')}.{block['/'.join(key[1:-1])]}"
        else:
            name = top[key[0]]
        array = np.asarray(value)
        writer.add_tensor(f"{name}.weight", array.T if key[-1] == "kernel" else array)
    if extra_tensor:
        writer.add_tensor("rope_freqs.weight", np.ones(2, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params


def test_load_a_written_gguf_round_trips(tmp_path, tiny_params):
    written = _write_tiny_gguf(tmp_path / "tiny.gguf", tiny_params)
    config, params = llama_weights.load_smollm2(tmp_path / "tiny.gguf")
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, params, written)


def test_a_rewritten_gguf_is_read_again(tmp_path, tiny_params):
    # GGUFFile shares the parsed metadata of an unchanged file, never of a rewritten one.
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tiny_params)
    assert "rope_freqs.weight" not in GGUFFile(path).tensor_names
    _write_tiny_gguf(path, tiny_params, extra_tensor=True)
    assert "rope_freqs.weight" in GGUFFile(path).tensor_names


def test_unmapped_tensor_is_an_error(tmp_path, tiny_params):
    _write_tiny_gguf(tmp_path / "tiny.gguf", tiny_params, extra_tensor=True)
    with pytest.raises(ValueError, match=r"not mapped onto the model: \['rope_freqs.weight'\]"):
        llama_weights.load_smollm2(tmp_path / "tiny.gguf")


@pytest.mark.parametrize(
    ("flax_path", "hf_name"),
    [
        ("layers_0/self_attn/q_proj", "model.layers.0.self_attn.q_proj"),
        ("layers_29/mlp/down_proj", "model.layers.29.mlp.down_proj"),
        ("layers_3/input_layernorm", "model.layers.3.input_layernorm"),
        ("embed_tokens", "model.embed_tokens"),
        ("norm", "model.norm"),
        ("lm_head", "lm_head"),
    ],
)
def test_name_map(flax_path, hf_name):
    assert llama_weights.flax_to_hf_module(flax_path) == hf_name
    assert llama_weights.hf_to_flax_path(hf_name) == flax_path


def test_errors(smollm2):
    config, params = smollm2
    with pytest.raises(ValueError, match="`path` 'layers_0/attn/q' is not a Llama module"):
        llama_weights.flax_to_hf_module("layers_0/attn/q")
    with pytest.raises(ValueError, match="`name` 'embed_tokens' is not a Llama module"):
        llama_weights.hf_to_flax_path("embed_tokens")
    with pytest.raises(ValueError, match="`prompt_ids` must be non-empty"):
        llama.generate(params, config, [], 2)
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        llama.generate(params, config, [1], 0)
    with pytest.raises(ValueError, match=r"`num_heads` \(3\) must be a multiple"):
        llama.LlamaConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="GGUF file not found"):
        llama_weights.load_smollm2("/nonexistent.gguf")
