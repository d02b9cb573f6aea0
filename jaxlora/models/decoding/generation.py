"""Text generation with a KV cache, for the reference decoders, with or without LoRA adapters.

:func:`generate` left-pads a batch of prompts of any lengths, runs the whole padded prompt through
the model in one call (the prefill, which fills a :class:`~jaxlora.models.decoding.KVCache`), then
feeds one token per step inside a ``jax.lax.while_loop``; the whole generation is one jitted
function per shape and setting. The loop ends early once every row has emitted a stop token; a
finished row emits ``pad_id`` from then on.

Any model that follows the cache contract works (:class:`~jaxlora.models.llama.LlamaForCausalLM`):
``model(ids, attention_mask=, positions=, cache=) -> (logits, new_cache)``, with an
``init_cache(config, batch, max_length, dtype)`` function in the model's module. The adapter runs
in one of four ways:

* ``lora=None``: the plain params;
* ``mode="factored"``: :func:`jaxlora.apply` computes ``x·W + s·(x·A)·B`` in every step;
* ``mode="merged"``: :func:`jaxlora.merge` once (inside the jitted function), then the plain model;
* ``adapter_index=``: a different adapter per row, from a :func:`jaxlora.adapters.stack` of
  adapters, through :func:`jaxlora.adapters.apply_mixed` (factored).

Decoding is greedy for ``temperature=0``; otherwise :func:`sample_logits` draws from the
temperature-scaled distribution restricted by ``top_k`` and ``top_p`` (nucleus), with step ``i``
using ``jax.random.fold_in(key, i)``: the same key gives the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

import jaxlora
from jaxlora._src import validate
from jaxlora.models.decoding.inputs import (
    as_batch,
    check_adapter,
    check_index,
    check_length,
    check_stop_tokens,
    left_pad,
    model_init_cache,
    stop_array,
)
from jaxlora.models.decoding.kv_cache import check_cache_dtype
from jaxlora.models.decoding.sampling import check_sampling, sample_logits
from jaxlora.models.token_ids import check_token_id, check_token_ids, vocab_size_of

__all__ = ["GenerationResult", "generate", "left_pad", "sample_logits", "step_function"]


class GenerationResult(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
        tokens: ``int32[batch, max_new_tokens]``: each row's new tokens (stop token included),
            then ``pad_id``.
        lengths: ``int32[batch]``: how many tokens each row generated, stop token included.
        finished: ``bool[batch]``: whether the row emitted a stop token.
        steps: ``int32`` scalar: model calls after the prefill (fewer than ``max_new_tokens - 1``
            when every row stopped early).
    """

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array
    steps: jax.Array


def step_function(model, params, lora, lora_config, adapter_index, mode):
    """``f(ids, mask, positions, cache) -> (logits, cache)`` for the chosen way of adapting."""
    if lora is None:
        return lambda *inputs: _call(model, {"params": params}, *inputs)
    if adapter_index is not None:
        return lambda *inputs: _call_mixed(model, params, lora, lora_config, adapter_index, *inputs)
    if mode == "merged":
        merged = jaxlora.merge(params, lora, lora_config)
        return lambda *inputs: _call(model, {"params": merged}, *inputs)
    return lambda ids, mask, positions, cache: jaxlora.apply(
        model, params, lora, lora_config, ids,
        attention_mask=mask, positions=positions, cache=cache, mode="factored",
    )  # fmt: skip


def _call(model, variables, ids, mask, positions, cache):
    return model.apply(variables, ids, attention_mask=mask, positions=positions, cache=cache)


def _row_call(module, ids, mask, positions, cache):
    # ``apply_mixed`` hands each row its inputs with a batch axis of one, the cache's shared
    # `length` included (given to it per row); the model wants that scalar back.
    logits, cache = module(ids, attention_mask=mask, positions=positions,
                           cache=cache.replace(length=cache.length[0]))  # fmt: skip
    return logits, cache.replace(length=cache.length[None])


def _call_mixed(model, frozen, stacked, lora_config, index, ids, mask, positions, cache):
    per_row = cache.replace(length=jnp.broadcast_to(cache.length, index.shape))
    logits, cache = jaxlora.adapters.apply_mixed(
        model, frozen, stacked, lora_config, index, ids, mask, positions, per_row, method=_row_call
    )
    return logits, cache.replace(length=cache.length[0])


@functools.partial(
    jax.jit,
    static_argnames=("model", "lora_config", "mode", "max_new_tokens", "top_k", "init_cache",
                     "cache_dtype"),
)  # fmt: skip
def _generate(model, params, lora, adapter_index, ids, mask, key, temperature, top_p, stop, pad,
              *, lora_config, mode, max_new_tokens, top_k, init_cache, cache_dtype):  # fmt: skip
    forward = step_function(model, params, lora, lora_config, adapter_index, mode)
    batch, prompt_length = ids.shape
    cache = init_cache(model.config, batch, prompt_length + max_new_tokens - 1, cache_dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    logits, cache = forward(ids, mask, positions, cache)

    def sample(logits, step):
        key_step = jax.random.fold_in(key, step)
        return sample_logits(logits[:, -1], key_step, temperature, top_p, top_k)

    def is_stop(token):
        return jnp.any(token[:, None] == stop[None, :], axis=1)

    first = sample(logits, 0)
    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    lengths = jnp.ones((batch,), jnp.int32)
    state = (jnp.int32(1), tokens, first, is_stop(first), lengths, positions[:, -1] + 1, cache)

    def unfinished(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(state):
        step, tokens, previous, done, lengths, position, cache = state
        logits, cache = forward(previous[:, None], jnp.ones((batch, 1), jnp.int32),
                                position[:, None], cache)  # fmt: skip
        token = jnp.where(done, pad, sample(logits, step))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, tokens, token, done | is_stop(token), lengths, position + 1, cache

    step, tokens, _, done, lengths, _, _ = jax.lax.while_loop(unfinished, decode, state)
    return GenerationResult(tokens, lengths, done, step - 1)


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]] | ArrayLike,
    *,
    max_new_tokens: int,
    attention_mask: ArrayLike | None = None,
    lora: Any = None,
    lora_config: jaxlora.LoraConfig | None = None,
    adapter_index: ArrayLike | None = None,
    mode: str = "factored",
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int | None = None,
    key: jax.Array | None = None,
    init_cache: Callable[..., Any] | None = None,
    cache_dtype: DTypeLike = jnp.float32,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens per prompt with a KV cache (jitted).

    Args:
        model: a decoder following the KV-cache contract, e.g. ``LlamaForCausalLM(config)``.
        params: its params; with ``lora``, the frozen base the adapter was split from.
        prompts: a list of token-id lists of any lengths (left-padded for you), one token-id
            list, or an int array ``[batch, length]`` already left-padded (with ``attention_mask``).
        max_new_tokens: the most tokens to generate per row (static: recompiles per value).
        attention_mask: with an array ``prompts``: 1 for real tokens, 0 for left padding.
        lora: an adapter from :func:`jaxlora.split`, or with ``adapter_index`` a stack of
            adapters from :func:`jaxlora.adapters.stack`.
        lora_config: the config the adapter(s) were made with.
        adapter_index: ``int[batch]``: row i runs adapter ``adapter_index[i]`` of the stack.
        mode: with ``lora``: ``"factored"`` (low-rank term in every step) or ``"merged"`` (merge
            once, then the plain model). Per-row adapters run factored.
        temperature: 0 for greedy decoding; else the softmax temperature.
        top_p: nucleus sampling: keep the fewest most likely tokens whose probability sums to at
            least ``top_p``; in ``(0, 1]``.
        top_k: if set, sample only among the ``top_k`` most likely tokens.
        stop_tokens: ids that end a row (the stop token is kept in ``tokens``).
        pad_id: what finished rows emit, also the prompt padding; defaults to the first stop token,
            else 0.
        key: a PRNG key, needed when ``temperature > 0``.
        init_cache: ``f(config, batch, max_length, dtype) -> KVCache``; defaults to the
            ``init_cache`` of the module defining ``model``'s class.
        cache_dtype: the dtype of the cached keys and values.

    Returns:
        A :class:`GenerationResult` ``(tokens, lengths, finished, steps)``.

    Raises:
        ValueError: for empty prompts, a prompt, stop or pad token id outside
            ``[0, model.config.vocab_size)`` (the error names the position), ``max_new_tokens
            < 1``, a sampling setting out of range, sampling without ``key``, an adapter without
            its config, ``adapter_index`` of the wrong shape or out of range, a prompt plus new
            tokens longer than the model's ``max_position_embeddings``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.models import llama
        >>> cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
        >>> model = llama.LlamaForCausalLM(cfg)
        >>> params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
        >>> result = generate(model, params, [[1, 5, 7], [1, 9]], max_new_tokens=4)
        >>> result.tokens.shape, result.lengths.tolist()
        ((2, 4), [4, 4])
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise TypeError(f"`max_new_tokens` must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_p, top_k, key)
    if key is not None:
        validate.prng_key("key", key)
    if init_cache is not None:
        validate.function("init_cache", init_cache)
    check_cache_dtype(cache_dtype, "cache_dtype")
    vocab_size = vocab_size_of(model)
    stop_tokens = check_stop_tokens(stop_tokens, vocab_size)
    if pad_id is None:
        pad_id = stop_tokens[0] if stop_tokens else 0
    pad_id = check_token_id(pad_id, vocab_size, "pad_id")
    ids, mask = as_batch(prompts, attention_mask, pad_id)
    # Checked where they enter: inside the jitted loop an id out of range would read a NaN (or
    # another token's) embedding row and generation would go on as if nothing were wrong.
    check_token_ids(ids, vocab_size, "prompts")
    check_length(model, ids.shape[1] + max_new_tokens)
    mode = check_adapter(lora, lora_config, mode)
    index = check_index(adapter_index, lora, ids.shape[0], mode)
    return _generate(
        model, params, lora, index, jnp.asarray(ids), jnp.asarray(mask),
        jax.random.key(0) if key is None else key, jnp.float32(temperature), jnp.float32(top_p),
        stop_array(stop_tokens), jnp.int32(pad_id),
        lora_config=lora_config, mode=mode, max_new_tokens=int(max_new_tokens),
        top_k=None if top_k is None else int(top_k),
        init_cache=init_cache or model_init_cache(model), cache_dtype=cache_dtype,
    )  # fmt: skip
