"""Gemma 1, 2 and 3 (text) decoders in Flax linen, with an optional KV cache.

One module family covers the three generations; :class:`GemmaConfig` switches the differences on:

* all: tied embeddings scaled by ``sqrt(hidden_size)`` (the scale rounded to the activation dtype,
  as Hugging Face does), zero-centred RMSNorm (``x̂ · (1 + scale)``, computed in float32), GeGLU
  feed-forward (``gelu`` with the tanh approximation), multi-query / grouped attention with a
  ``head_dim`` independent of ``hidden_size``, rotate-half RoPE;
* Gemma 2: attention scores scaled by ``query_pre_attn_scalar ** -0.5``, attention-logit and
  final-logit soft-capping (``cap · tanh(x / cap)``), ``post_attention``, ``pre_feedforward`` and
  ``post_feedforward`` norms, sliding-window attention on alternate layers;
* Gemma 3: q/k norms over ``head_dim``, per-layer ``layer_types``, a local RoPE base for the
  sliding layers and an optionally linearly scaled global one.

Module paths follow Hugging Face's ``Gemma*ForCausalLM`` (``model.`` dropped), each projection a
plain 2-D ``nn.Dense`` without bias, so ``target_modules=["q_proj", "v_proj"]`` works as for Llama::

    embed_tokens, norm, lm_head (only if embeddings are untied)
    layers_{i}/input_layernorm, layers_{i}/post_attention_layernorm,
    layers_{i}/pre_feedforward_layernorm, layers_{i}/post_feedforward_layernorm (Gemma 2/3)
    layers_{i}/self_attn/{q,k,v,o}_proj, layers_{i}/self_attn/{q,k}_norm (Gemma 3)
    layers_{i}/mlp/{gate,up,down}_proj

A norm's ``scale`` holds Hugging Face's ``weight`` unchanged (zero means identity). Weights load
with :func:`jaxlora.models.hf.gemma.load_hf_gemma`.

The cache path (``cache=``, see :mod:`jaxlora.models.decoding.kv_cache`) keeps every layer's
keys for all ``max_length`` slots; a sliding layer masks slots at or beyond ``sliding_window``
behind the query rather than evicting them, so its answers match the uncached forward exactly.

The config is in :mod:`jaxlora.models.gemma.config`, the decoder block in
:mod:`jaxlora.models.gemma.layers`.
"""

from __future__ import annotations

import math
from typing import overload

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxlora._src import validate
from jaxlora.models.decoding.kv_cache import KVCache, cache_positions
from jaxlora.models.gemma.config import FULL as FULL
from jaxlora.models.gemma.config import SLIDING as SLIDING
from jaxlora.models.gemma.config import GemmaConfig as GemmaConfig
from jaxlora.models.gemma.layers import GemmaBlock, GemmaRMSNorm, softcap
from jaxlora.models.token_ids import check_token_ids

__all__ = ["FULL", "SLIDING", "GemmaConfig", "GemmaForCausalLM", "init_cache"]


def init_cache(
    config: GemmaConfig, batch: int, max_length: int, dtype: DTypeLike = jnp.float32
) -> KVCache:
    """An empty :class:`~jaxlora.models.decoding.KVCache` for ``GemmaForCausalLM(config)``.

    Example:
        >>> cfg = GemmaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=2,
        ...                   num_heads=2, num_kv_heads=1, head_dim=4)
        >>> init_cache(cfg, batch=1, max_length=6).keys[1].shape
        (1, 6, 1, 4)
    """
    if not isinstance(config, GemmaConfig):
        raise validate.fail_type("config", "a GemmaConfig", config)
    validate.positive_int("batch", batch)
    validate.positive_int("max_length", max_length)
    validate.float_dtype("dtype", dtype)
    return KVCache.init(
        config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim, dtype
    )


class GemmaForCausalLM(nn.Module):
    """Token ids in, next-token logits ``float32[batch, length, vocab]`` out.

    With ``cache=`` it processes the new tokens only and returns ``(logits, new_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
        ...                   num_heads=4, num_kv_heads=1, head_dim=8, sliding_window=2,
        ...                   layer_types=(SLIDING, FULL), sandwich_norms=True)
        >>> ids = jnp.ones((1, 6), jnp.int32)
        >>> params = jax.jit(GemmaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
        >>> jax.jit(GemmaForCausalLM(cfg).apply)({"params": params}, ids).shape
        (1, 6, 32)
    """

    config: GemmaConfig = GemmaConfig()

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size)
        # A list attribute gets the submodule names layers_0, layers_1, …
        self.layers = [GemmaBlock(cfg, i) for i in range(cfg.num_layers)]
        self.norm = GemmaRMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

    def _masks(
        self, valid: jax.Array, cache: KVCache | None, length: int
    ) -> tuple[jax.Array, jax.Array]:
        """Full and sliding attention masks, ``bool[batch, 1, 1, T, S]``."""
        window = self.config.sliding_window
        if cache is not None:
            full = cache.attention_mask(valid)
            sliding = full if window is None else cache.attention_mask(valid, window=window)
            return full[:, :, None], sliding[:, :, None]
        slot = jnp.arange(length, dtype=jnp.int32)
        seen = slot[None, :] <= slot[:, None]
        full = seen[None] & valid[:, None, :]
        if window is not None:
            seen = seen & (slot[:, None] - slot[None, :] < window)
        sliding = seen[None] & valid[:, None, :]
        return full[:, None, None], sliding[:, None, None]

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
        """The final normalised hidden states ``[batch, T, hidden]`` (and, with ``cache``, the
        advanced cache).

        Args:
            input_ids: ``int[batch, T]``: the whole sequence, or with ``cache`` the new tokens.
            attention_mask: 1 for tokens to attend to, 0 for (left) padding; defaults to all ones.
                Attention is causal in any case (and windowed on sliding layers).
            positions: RoPE positions; defaults to ``0 … T-1`` without a cache, and with one to
                :func:`~jaxlora.models.decoding.cache_positions` (each row's real tokens counted
                from 0, so left padding is handled).
            cache: A :class:`~jaxlora.models.decoding.KVCache` from :func:`init_cache`, or None.
        """
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")  # concrete ids only
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {input_ids.shape}")
        batch, length = input_ids.shape
        valid = jnp.ones((batch, length), bool)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"`attention_mask` must have the shape of `input_ids` {input_ids.shape}, "
                    f"got {attention_mask.shape}"
                )
            valid = attention_mask > 0
        full, sliding = self._masks(valid, cache, length)
        if positions is None and cache is not None:
            positions = cache_positions(cache, valid)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions = jnp.asarray(positions)
        x = self.embed_tokens(input_ids)
        # Hugging Face rounds sqrt(hidden) to float32, then to the embedding's dtype.
        x = x * jnp.asarray(np.float32(math.sqrt(self.config.hidden_size))).astype(x.dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            mask = sliding if self.config.is_sliding(i) else full
            x, written = layer(x, positions, mask, cache)
            if written is not None:
                keys.append(written[0])
                values.append(written[1])
        if cache is None:
            return self.norm(x)
        return self.norm(x), cache.advance(keys, values, valid)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits from hidden states: the tied embedding (or ``lm_head``), soft-capped."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)

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
        """Logits, or ``(logits, new_cache)`` when ``cache`` is given; see :meth:`hidden_states`."""
        if cache is None:
            return self.logits(self.hidden_states(input_ids, attention_mask, positions))
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache)
        return self.logits(hidden), new_cache
