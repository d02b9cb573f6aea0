"""The KV cache: cached prefill + decode of the Llama decoder equals the uncached forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import llama
from jaxlora.models.decoding.kv_cache import KVCache, cache_positions

BASE = dict(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=12,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    rope_interleaved=False,
)
CONFIGS = {
    "plain": llama.LlamaConfig(**BASE),
    "family": llama.LlamaConfig(
        **BASE,
        tie_word_embeddings=False,
        qkv_bias=True,
        o_proj_bias=True,
        qk_norm=True,
        rope_scaling=llama.Llama3RopeScaling(4.0, 1.0, 4.0, 8),
        sliding_window=3,
        full_attention_layers=(1,),
    ),
}


@functools.partial(jax.jit, static_argnums=0)
def _params(config):
    params = llama.LlamaForCausalLM(config).init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))
    # Non-zero biases and norm scales, so that a bias or norm left out would show.
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


@functools.partial(jax.jit, static_argnums=0)
def _full(config, params, ids):
    return llama.LlamaForCausalLM(config).apply({"params": params}, ids)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _cached(config, params, ids, mask, prefill):
    """Prefill ``prefill`` tokens, then decode the rest one by one (``lax.scan``)."""
    model = llama.LlamaForCausalLM(config)

    def call(cache, ids, mask):
        return model.apply({"params": params}, ids, attention_mask=mask, cache=cache)

    cache = llama.init_cache(config, ids.shape[0], ids.shape[1] + 2)
    first, cache = call(cache, ids[:, :prefill], mask[:, :prefill])

    def decode(cache, step):
        logits, cache = call(cache, step[0][:, None], step[1][:, None])
        return cache, logits[:, 0]

    cache, rest = jax.lax.scan(decode, cache, (ids[:, prefill:].T, mask[:, prefill:].T))
    return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow  # seconds of compiling: full suite only
def test_cached_prefill_and_decode_equal_full_forward(name):
    config = CONFIGS[name]
    params = _params(config)
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    # Row 1 is left-padded by 2: its 5 real tokens must give the logits they give alone.
    padded = ids.at[1].set(jnp.roll(ids[1], 2).at[:2].set(0))
    mask = jnp.array([[1] * 7, [0, 0] + [1] * 5])
    full = _full(config, params, ids)
    cached, cache = _cached(config, params, padded, mask, 3)
    np.testing.assert_allclose(cached[0], full[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cached[1, 2:], full[1, :5], atol=1e-5, rtol=1e-5)
    assert int(cache.length) == 7
    assert cache.valid.tolist() == [
        [True] * 7 + [False] * 2,
        [False] * 2 + [True] * 5 + [False] * 2,
    ]


@pytest.mark.slow  # seconds of compiling: full suite only
def test_cache_under_jaxlora_apply_factored_and_merged():
    config = CONFIGS["family"]
    model = llama.LlamaForCausalLM(config)
    params = _params(config)
    lora_config = jaxlora.LoraConfig(r=2, target_modules=r".*(q_proj|v_proj|down_proj)")

    @jax.jit  # one program: op by op, every leaf shape compiles its own random ops
    def split(params):
        frozen, lora = jaxlora.split(params, lora_config, jax.random.key(4))
        return frozen, jax.tree.map(lambda x: x + 0.1, lora)  # B != 0: the adapter acts

    frozen, lora = split(params)
    # The shape test_cached_prefill_and_decode_equal_full_forward runs `_full` on: compiled once.
    ids = jax.random.randint(jax.random.key(5), (2, 7), 0, config.vocab_size)

    @functools.partial(jax.jit, static_argnums=1)
    def run(lora, mode):
        full = jaxlora.apply(model, frozen, lora, lora_config, ids, mode=mode)
        cache = llama.init_cache(config, 2, 8)
        first, cache = jaxlora.apply(model, frozen, lora, lora_config, ids[:, :6], cache=cache,
                                     mode=mode)  # fmt: skip
        last, _ = jaxlora.apply(model, frozen, lora, lora_config, ids[:, 6:], cache=cache,
                                mode=mode)  # fmt: skip
        return full, jnp.concatenate([first, last], axis=1)

    for mode in ("factored", "merged"):
        full, cached = run(lora, mode)
        np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(full - _full(config, params, ids)))) > 1e-3


@pytest.mark.slow  # seconds of compiling: full suite only
def test_attention_mask_semantics():
    cache = KVCache.init(1, batch=2, max_length=5, num_kv_heads=1, head_dim=2)
    k = jnp.ones((2, 3, 1, 2))
    keys, values = cache.write(0, k, 2 * k)
    new_valid = jnp.array([[True, True, True], [False, True, True]])
    mask = cache.attention_mask(new_valid)
    assert mask.shape == (2, 1, 3, 5)
    assert mask[1, 0].astype(int).tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    cache = cache.advance([keys], [values], new_valid)
    assert cache_positions(cache, jnp.ones((2, 1), bool)).tolist() == [[3], [2]]
    windowed = cache.attention_mask(jnp.ones((2, 1), bool), window=2)
    assert windowed[0, 0].astype(int).tolist() == [[0, 0, 1, 1, 0]]
    keys, _ = cache.write(0, 3 * jnp.ones((2, 1, 1, 2)), jnp.ones((2, 1, 1, 2)))
    assert keys[0, :, 0, 0].tolist() == [1, 1, 1, 3, 0]


def test_bad_cache_inputs_name_the_argument():
    cache = KVCache.init(2, batch=1, max_length=4, num_kv_heads=2, head_dim=2)
    with pytest.raises(ValueError, match="`layer`"):
        cache.write(2, jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="`k`"):
        cache.write(0, jnp.ones((1, 1, 3, 2)), jnp.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="`new_valid`"):
        cache.attention_mask(jnp.ones((2, 1), bool))
    with pytest.raises(ValueError, match="`keys`"):
        cache.advance([], [], jnp.ones((1, 1), bool))
    with pytest.raises(ValueError, match="`max_length`"):
        KVCache.init(1, 1, 0, 1, 2)
