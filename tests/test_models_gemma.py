"""Gemma 1/2/3 against transformers itself: tiny random checkpoints, logits, cache, LoRA, errors."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora.models import gemma
from jaxlora.models.decoding import generate as generate_tokens
from jaxlora.models.hf import gemma as gemma_weights

pytestmark = pytest.mark.slow  # builds and runs PyTorch transformers models

VOCAB, LENGTH = 48, 9
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attn_implementation="eager",
)
# Windows of 3 < LENGTH, so the sliding layers see less than the full layers do.
FAMILIES = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            sliding_window=3,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            sliding_window=3,
            sliding_window_pattern=2,
            query_pre_attn_scalar=12,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
}


def _torch_model(family):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, **extra)).eval()
    with torch.no_grad():  # random norms too: transformers initialises them to zero (identity)
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model


_SAVED = {}


def checkpoint_dir(family, tmp_path_factory):
    """``(family, torch model, directory, config, params)``, built once per family."""
    if family not in _SAVED:
        model = _torch_model(family)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        config, params = gemma_weights.load_hf_gemma(directory)
        _SAVED[family] = family, model, directory, config, params
    return _SAVED[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    return checkpoint_dir(request.param, tmp_path_factory)


def sample_ids(batch=2, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, LENGTH))


def torch_logits(model, ids, mask=None, positions=None):
    tensor = lambda a: None if a is None else torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        out = model(tensor(ids), attention_mask=tensor(mask), position_ids=tensor(positions))
    return out.logits.numpy()


def forward(config, params, *args):
    """``GemmaForCausalLM(config)`` logits, jitted (op by op, every call compiles each op anew)."""
    return jax.jit(gemma.GemmaForCausalLM(config).apply)({"params": params}, *args)


def _left_padded():
    ids = sample_ids()
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1: three padding tokens, then six real ones
    ids[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def test_config_matches_the_family(checkpoint):
    family, _, _, config, _ = checkpoint
    sliding = config.layer_types.count(gemma.SLIDING)
    assert (config.num_layers, config.head_dim, config.num_kv_heads) == (4, 16, 2)
    assert sliding == {"gemma": 0, "gemma2": 2, "gemma3": 2}[family]
    assert config.sandwich_norms == (family != "gemma")
    assert config.qk_norm == (family == "gemma3")
    if family == "gemma2":
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (2.0, 3.0)
        assert config.layer_types[:2] == (gemma.SLIDING, gemma.FULL)
    if family == "gemma3":
        assert config.rope(0) == (100.0, 1.0)  # local RoPE, unscaled
        assert config.rope(1) == (1_000_000.0, 4.0)  # global RoPE, linearly scaled


def test_logits_match_transformers(checkpoint):
    # Row 0 is a plain sequence, row 1 is left-padded: both must match, on the real tokens.
    _, model, _, config, params = checkpoint
    ids, mask, positions = _left_padded()
    logits = jax.jit(gemma.GemmaForCausalLM(config).apply)(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)
    )
    assert logits.dtype == jnp.float32
    expected = torch_logits(model, ids, mask, positions)
    real = mask.astype(bool)
    assert real[0].all() and not real[1].all()
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-4, rtol=0)


def test_sliding_window_changes_the_answer(checkpoint):
    family, _, _, config, params = checkpoint
    if family == "gemma":  # Gemma 1 attends to everything on every layer
        assert config.sliding_window is None and set(config.layer_types) == {gemma.FULL}
        return
    ids = jnp.asarray(sample_ids())
    wide = dataclasses.replace(config, sliding_window=LENGTH)
    narrow = forward(config, params, ids)
    full = forward(wide, params, ids)
    # Within the window nothing differs; beyond it the sliding layers see less.
    np.testing.assert_allclose(narrow[:, :3], full[:, :3], atol=1e-6, rtol=0)
    assert float(jnp.abs(narrow[:, 3:] - full[:, 3:]).max()) > 1e-3


def _cached_logits(config, params, ids, mask, prefill):
    """Prefill ``prefill`` tokens, then decode one token per call; logits of every position."""
    model = gemma.GemmaForCausalLM(config)
    step = jax.jit(lambda ids, mask, cache: model.apply({"params": params}, ids, mask, cache=cache))
    cache = gemma.init_cache(config, ids.shape[0], ids.shape[1])
    logits, cache = step(ids[:, :prefill], mask[:, :prefill], cache)
    out = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(ids[:, t : t + 1], mask[:, t : t + 1], cache)
        out.append(logits)
    assert int(cache.length) == ids.shape[1]
    return jnp.concatenate(out, axis=1)


def test_cached_decode_equals_uncached_forward(checkpoint):
    _, _, _, config, params = checkpoint
    ids, mask, positions = (jnp.asarray(a) for a in _left_padded())
    uncached = forward(config, params, ids, mask, positions)
    cached = _cached_logits(config, params, ids, mask, prefill=4)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(uncached)[real], atol=1e-5)


def trained_adapter(params, lora_config):
    """``split``, then random factors: a fresh B is zero, which would make a check vacuous."""
    frozen, lora = jaxlora.split(params, lora_config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return frozen, treedef.unflatten([0.1 * n for n in noise])


def test_lora_factored_equals_merged(tmp_path_factory):
    # Gemma 3: the family with the most kinds of module (q/k norms beside the adapted q/v).
    _, _, _, config, params = checkpoint_dir("gemma3", tmp_path_factory)
    lora_config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    targets = {t.path for t in jaxlora.find_targets(params, lora_config)}
    assert len(targets) == 2 * config.num_layers
    frozen, lora = trained_adapter(params, lora_config)
    model = gemma.GemmaForCausalLM(config)
    ids = jnp.asarray(sample_ids())
    base = jax.jit(model.apply)({"params": params}, ids)

    @functools.partial(jax.jit, static_argnames="mode")
    def run(lora, cache, mode):
        return jaxlora.apply(model, frozen, lora, lora_config, ids, cache=cache, mode=mode)

    merged = run(lora, None, "merged")
    factored = run(lora, None, "factored")
    np.testing.assert_allclose(factored, merged, atol=1e-4, rtol=0)  # float order only
    assert float(jnp.abs(factored - base).max()) > 1e-3
    cached, cache = run(lora, gemma.init_cache(config, 2, LENGTH), "factored")
    np.testing.assert_allclose(cached, merged, atol=1e-4, rtol=0)
    assert int(cache.length) == LENGTH


def test_peft_export_runs_in_transformers(tmp_path_factory, tmp_path):
    import peft

    _, _, directory, config, params = checkpoint_dir("gemma2", tmp_path_factory)
    lora_config = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    frozen, lora = trained_adapter(params, lora_config)
    model = gemma.GemmaForCausalLM(config)
    ids = sample_ids()
    adapted = jax.jit(lambda lora: jaxlora.apply(model, frozen, lora, lora_config, ids))(lora)
    name = gemma_weights.peft_module_name
    jaxlora.save_peft(tmp_path, lora, lora_config, frozen, module_name=name)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    np.testing.assert_allclose(torch_logits(peft_model, ids), adapted, atol=1e-4, rtol=0)
    back, _ = jaxlora.load_peft(tmp_path, frozen, module_name=name)
    jax.tree.map(np.testing.assert_array_equal, back, lora)


# Hub-style config.json files (older transformers): keys left to the class defaults, rope_scaling.
HUB_CONFIGS = {
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 12,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "gemma2": {"model_type": "gemma2", "num_hidden_layers": 6, "hidden_activation": "gelu"},
    "gemma": {"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": None},
}


@pytest.mark.parametrize("model_type", sorted(HUB_CONFIGS))
def test_hub_configs_read_as_transformers_reads_them(model_type):
    document = HUB_CONFIGS[model_type]
    reference = transformers.AutoConfig.for_model(**document)
    config = gemma_weights.config_from_hf(document)
    assert config.num_layers == reference.num_hidden_layers
    assert config.vocab_size == reference.vocab_size
    assert config.head_dim == reference.head_dim
    assert config.num_kv_heads == reference.num_key_value_heads
    assert config.max_position_embeddings == reference.max_position_embeddings
    if model_type == "gemma":
        assert config.layer_types == (gemma.FULL,) * config.num_layers
        assert config.gelu_approximate  # Gemma 1's legacy "gelu" is the tanh approximation
        assert config.rope(0) == (reference.rope_parameters["rope_theta"], 1.0)
        return
    assert config.layer_types == tuple(reference.layer_types)
    assert config.sliding_window == reference.sliding_window
    assert config.query_pre_attn_scalar == reference.query_pre_attn_scalar
    assert config.attn_logit_softcapping == reference.attn_logit_softcapping
    assert config.final_logit_softcapping == reference.final_logit_softcapping
    if model_type == "gemma2":
        assert not config.gelu_approximate  # Gemma 2's "gelu" is exact in transformers
        return
    full, local = reference.rope_parameters[gemma.FULL], reference.rope_parameters[gemma.SLIDING]
    assert config.rope(config.layer_types.index(gemma.FULL)) == (full["rope_theta"], 8.0)
    assert config.rope(0) == (local["rope_theta"], 1.0)


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    return checkpoint_dir("gemma2", tmp_path_factory)[2]


def _edited_copy(source, target, edit):
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(target, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(target, "model.safetensors"))
    return target


def test_missing_tensor_is_named(gemma2_dir, tmp_path):
    name = "model.layers.1.pre_feedforward_layernorm.weight"
    directory = _edited_copy(gemma2_dir, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match="pre_feedforward_layernorm"):
        gemma_weights.load_hf_gemma(directory)


def test_unexpected_tensor_is_named(gemma2_dir, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.zeros(16, np.float32)

    directory = _edited_copy(gemma2_dir, tmp_path, add)
    with pytest.raises(ValueError, match="q_norm"):
        gemma_weights.load_hf_gemma(directory)


def test_misshapen_tensor_is_named(gemma2_dir, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:8]

    directory = _edited_copy(gemma2_dir, tmp_path, shrink)
    with pytest.raises(ValueError, match="layers.2.self_attn.k_proj"):
        gemma_weights.load_hf_gemma(directory)


@pytest.mark.parametrize(
    ("config_json", "match"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": "gemma2", "use_bidirectional_attention": True}, "bidirectional"),
        ({"model_type": "gemma", "rope_scaling": {"rope_type": "yarn", "factor": 2}}, "yarn"),
        ({"model_type": "gemma2", "hidden_activation": "relu"}, "relu"),
        ({"model_type": "gemma2", "num_hidden_layers": 3, "layer_types": ["x"] * 3}, "layer_types"),
    ],
)
def test_bad_configs_are_refused(config_json, match):
    with pytest.raises(ValueError, match=match):
        gemma_weights.config_from_hf(config_json)


def test_config_validation():
    with pytest.raises(ValueError, match="layer_types"):
        gemma.GemmaConfig(num_layers=2, layer_types=(gemma.FULL,))
    with pytest.raises(ValueError, match="sliding_window"):
        gemma.GemmaConfig(num_layers=1, layer_types=(gemma.SLIDING,))
    with pytest.raises(TypeError, match="tuple"):
        gemma.GemmaConfig(num_layers=1, layer_types=[gemma.FULL])


def test_multimodal_gemma3_gives_its_text_decoder(tmp_path):
    text = {k: v for k, v in TINY.items() if k != "attn_implementation"}
    text |= dict(FAMILIES["gemma3"][2], vocab_size=VOCAB + 8)
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB + 5,
        eoi_token_index=VOCAB + 6,
        image_token_index=VOCAB + 7,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path)
    loaded, params = gemma_weights.load_hf_gemma(tmp_path)
    assert loaded.qk_norm and loaded.vocab_size == VOCAB + 8
    ids = sample_ids()  # text tokens only: below the image tokens
    logits = jax.jit(gemma.GemmaForCausalLM(loaded).apply)({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(logits, torch_logits(model, ids), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path_factory):
    # Gemma 2: soft-caps and alternating windows, over a prompt plus new tokens past the window.
    _, model, _, config, params = checkpoint_dir("gemma2", tmp_path_factory)
    prompt = sample_ids(batch=1)[:, :5]
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompt),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, 5:].numpy()
    result = generate_tokens(gemma.GemmaForCausalLM(config), params, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(result.tokens[0], expected)
    # A tiny random model repeats itself, so the tokens alone say little: compare the logits of
    # transformers' cached decoding with the uncached forward over the same sequence.
    sequence = jnp.asarray(out.sequences.numpy()[:, :-1])
    logits = jax.jit(gemma.GemmaForCausalLM(config).apply)({"params": params}, sequence)
    steps = np.stack([step[0].numpy() for step in out.logits])
    np.testing.assert_allclose(logits[0, 4:], steps, atol=1e-4, rtol=0)


def test_bfloat16_loading(tmp_path_factory):
    _, model, directory, config, _ = checkpoint_dir("gemma3", tmp_path_factory)
    _, params = gemma_weights.load_hf_gemma(directory, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = sample_ids()
    logits = jax.jit(gemma.GemmaForCausalLM(config).apply)({"params": params}, jnp.asarray(ids))
    assert logits.dtype == jnp.float32
    # bfloat16 rounding only: transformers' own bfloat16 model is 0.17 off its float32 one here.
    np.testing.assert_allclose(logits, torch_logits(model, ids), atol=0.2, rtol=0)
