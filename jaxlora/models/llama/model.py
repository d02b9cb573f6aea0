"""A Llama-style decoder in Flax linen (GQA, RoPE, RMSNorm, SwiGLU) and greedy generation.

Every projection is a plain 2-D ``nn.Dense`` without bias; module paths follow Hugging Face's
``LlamaForCausalLM`` (``model.`` dropped)::

    embed_tokens, norm, lm_head (only if embeddings are untied)
    layers_{i}/input_layernorm, layers_{i}/post_attention_layernorm
    layers_{i}/self_attn/{q,k,v,o}_proj, layers_{i}/mlp/{gate,up,down}_proj

RoPE comes in two layouts (:mod:`jaxlora.models.llama.rope`). GGUF files store the q/k rows of each
head permuted so that rotary pairs are adjacent dimensions (0&1, 2&3, …);
:attr:`LlamaConfig.rope_interleaved` = True matches that. Hugging Face checkpoints pair dimension i
with i + head_dim/2 ("rotate half"); set it False.
:func:`jaxlora.models.llama.weights.load_smollm2` can give either.

The config (:mod:`jaxlora.models.llama.config`) also covers the rest of the family that
:func:`jaxlora.models.hf.llama.load_hf` reads: q/k/v (and o) biases (Qwen2), per-head q/k RMS norms
(Qwen3), Llama 3.x RoPE scaling (:class:`Llama3RopeScaling`) and sliding-window attention
(Mistral). Each defaults to off. The decoder block is in :mod:`jaxlora.models.llama.layers`.

Passing a :class:`~jaxlora.models.decoding.KVCache` (from :func:`init_cache`) as ``cache=`` makes
the model process only the new tokens and return ``(logits, new_cache)``.
"""

from __future__ import annotations

from typing import overload

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxlora._src import validate
from jaxlora.models.decoding.kv_cache import KVCache, cache_positions
from jaxlora.models.llama.config import LlamaConfig as LlamaConfig
from jaxlora.models.llama.layers import LlamaBlock, cache_masks, full_masks
from jaxlora.models.llama.rope import Llama3RopeScaling as Llama3RopeScaling
from jaxlora.models.llama.rope import apply_rope as apply_rope
from jaxlora.models.llama.rope import rope_frequencies as rope_frequencies
from jaxlora.models.token_ids import check_token_ids

__all__ = [
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "apply_rope",
    "init_cache",
    "rope_frequencies",
]


class LlamaForCausalLM(nn.Module):
    """Token ids in, next-token logits ``float32[batch, length, vocab]`` out.

    With ``cache=`` (a :class:`~jaxlora.models.decoding.KVCache` from :func:`init_cache`) the
    call processes only the new tokens and returns ``(logits, new_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=4)
        >>> ids = jnp.ones((1, 6), jnp.int32)
        >>> params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
        >>> forward = jax.jit(LlamaForCausalLM(cfg).apply)
        >>> forward({"params": params}, ids).shape
        (1, 6, 32)
        >>> logits, cache = forward({"params": params}, ids,
        ...                         cache=init_cache(cfg, batch=1, max_length=8))
        >>> int(cache.length)
        6
    """

    config: LlamaConfig = LlamaConfig()

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size)
        # A list attribute gets the submodule names layers_0, layers_1, …
        self.layers = [LlamaBlock(cfg) for _ in range(cfg.num_layers)]
        self.norm = nn.RMSNorm(epsilon=cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

    @overload
    def hidden_states(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: None = None,
    ) -> jax.Array: ...
    @overload
    def hidden_states(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        *,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]: ...
    @overload
    def hidden_states(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None,
        positions: ArrayLike | None,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]: ...
    def hidden_states(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """The final normalised hidden states ``float32[batch, length, hidden]``.

        Args:
            input_ids: ``int[batch, length]``.
            attention_mask: 1 for tokens to attend to, 0 for padding; defaults to all ones.
                Attention is causal in any case.
            positions: RoPE positions; defaults to ``0 … length-1`` in every row (with ``cache``:
                :func:`~jaxlora.models.decoding.cache_positions`, which counts only real tokens).
            cache: If given, ``input_ids`` are the next tokens after those in the cache; the
                result is then ``(hidden, new_cache)``.
        """
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")  # concrete ids only
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
            masks = full_masks(self.config, length, attention_mask)
            x, _, _ = self._blocks(input_ids, jnp.asarray(positions), masks, None)
            return self.norm(x)
        new_valid = (
            jnp.ones(input_ids.shape, bool)
            if attention_mask is None
            else jnp.asarray(attention_mask) > 0
        )
        if positions is None:
            positions = cache_positions(cache, new_valid)
        masks = cache_masks(self.config, cache, new_valid)
        x, keys, values = self._blocks(input_ids, jnp.asarray(positions), masks, cache)
        return self.norm(x), cache.advance(keys, values, new_valid)

    def _blocks(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        masks: list[jax.Array],
        cache: KVCache | None,
    ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
        """The embedded ``input_ids`` through every block, and (with ``cache``) each layer's
        updated key and value buffers."""
        x = self.embed_tokens(input_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, masks[i], cache, i)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        return x, keys, values

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Projects hidden states onto the vocabulary (the tied embedding, or ``lm_head``)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    @overload
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: None = None,
    ) -> jax.Array: ...
    @overload
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        *,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]: ...
    @overload
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None,
        positions: ArrayLike | None,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]: ...
    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Returns next-token logits (and the new cache); arguments as :meth:`hidden_states`."""
        if cache is None:
            return self.logits(self.hidden_states(input_ids, attention_mask, positions))
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache)
        return self.logits(hidden), new_cache


def init_cache(
    config: LlamaConfig, batch: int, max_length: int, dtype: DTypeLike = jnp.float32
) -> KVCache:
    """An empty :class:`~jaxlora.models.decoding.KVCache` sized for ``config``'s layers."""
    if not isinstance(config, LlamaConfig):
        raise validate.fail_type("config", "a LlamaConfig", config)
    validate.positive_int("batch", batch)
    validate.positive_int("max_length", max_length)
    validate.float_dtype("dtype", dtype)
    return KVCache.init(
        config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim, dtype
    )
