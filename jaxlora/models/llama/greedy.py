"""An uncached greedy decoder for :class:`LlamaForCausalLM`: each step runs the whole sequence.

The reference the cached decoder (:func:`jaxlora.models.generate`) is checked against.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlora._src import validate
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.model import LlamaForCausalLM
from jaxlora.models.token_ids import check_token_id, check_token_ids

__all__ = ["generate"]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_id"))
def _greedy(
    params: Any, config: LlamaConfig, prompt: jax.Array, max_new_tokens: int, eos_id: int
) -> jax.Array:
    model = LlamaForCausalLM(config)
    batch, prompt_length = prompt.shape
    tokens = jnp.zeros((batch, prompt_length + max_new_tokens), jnp.int32)
    tokens = tokens.at[:, :prompt_length].set(prompt)

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        tokens, done = carry
        # Causal attention makes the not-yet-written tail invisible to earlier positions, so the
        # whole fixed-size buffer can be re-run each step without a KV cache.
        hidden = model.apply({"params": params}, tokens, method=LlamaForCausalLM.hidden_states)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_length + i - 1, axis=1)
        # Without `mutable`, `apply` returns only the method's output (flax types it as a union).
        logits = cast(
            jax.Array, model.apply({"params": params}, last, method=LlamaForCausalLM.logits)
        )
        next_token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, jnp.int32(eos_id), next_token)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token, prompt_length + i, 1)
        return tokens, done | (next_token == eos_id)

    done = jnp.zeros((batch,), bool)
    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, done))
    return tokens[:, prompt_length:]


def generate(
    params: Any,
    config: LlamaConfig,
    prompt_ids: Sequence[int] | ArrayLike,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> jax.Array:
    """Greedy decoding (jitted; recompiles per prompt length and ``max_new_tokens``).

    There is no KV cache: each step re-runs the model over the fixed-size token buffer, which is
    fine for a few dozen tokens. For SmolLM2-Instruct prompts see
    :mod:`jaxlora.models.llama.weights` (e.g. :func:`~jaxlora.models.llama.weights.chat_prompt`).

    Args:
        params: ``LlamaForCausalLM(config)`` params.
        config: The model's config.
        prompt_ids: ``int[length]`` or ``int[batch, length]`` (all rows the same length).
        max_new_tokens: How many tokens to generate.
        eos_id: Once a row emits it, the row's later tokens are ``eos_id`` too; defaults to
            ``config.eos_token_id``.

    Returns:
        The new tokens, ``int32[max_new_tokens]`` or ``int32[batch, max_new_tokens]``.

    Raises:
        ValueError: If ``prompt_ids`` is empty or not 1-D/2-D, holds an id outside
            ``[0, config.vocab_size)`` (named with its position), if ``eos_id`` is outside it,
            or ``max_new_tokens < 1``.
    """
    if not isinstance(config, LlamaConfig):
        raise validate.fail_type("config", "a LlamaConfig", config)
    validate.tree("params", params)
    validate.integer("max_new_tokens", max_new_tokens)
    if eos_id is not None:
        validate.integer("eos_id", eos_id, minimum=0)
    check_token_ids(prompt_ids, config.vocab_size, "prompt_ids")  # before the int32 cast
    prompt = jnp.asarray(prompt_ids, dtype=jnp.int32)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(
            f"`prompt_ids` must be non-empty (length,) or (batch, length), got shape {prompt.shape}"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"`max_new_tokens` must be an int, got {max_new_tokens!r:.60}")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    eos = config.eos_token_id if eos_id is None else eos_id
    eos_name = "config.eos_token_id" if eos_id is None else "eos_id"
    eos = check_token_id(eos, config.vocab_size, eos_name)
    out = _greedy(params, config, jnp.atleast_2d(prompt), max_new_tokens, eos)
    return out[0] if prompt.ndim == 1 else out
