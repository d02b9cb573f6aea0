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
with :func:`jaxlora.models.gemma_weights.load_hf_gemma`.

The cache path (``cache=``, see :mod:`jaxlora.models.kv_cache`) keeps every layer's keys for all
``max_length`` slots; a sliding layer masks slots at or beyond ``sliding_window`` behind the query
rather than evicting them, so its answers match the uncached forward exactly.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxlora.models.kv_cache import KVCache, cache_positions

__all__ = ["FULL", "SLIDING", "GemmaConfig", "GemmaForCausalLM", "init_cache"]

#: ``layer_types`` entries, Hugging Face's names.
FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters of a Gemma decoder; the defaults are Gemma 1 2B's.

    Gemma 2 and 3 set ``sandwich_norms``, ``query_pre_attn_scalar``, ``sliding_window`` and
    ``layer_types`` (Gemma 2 also the soft-caps, Gemma 3 ``qk_norm`` and the local RoPE).
    :func:`jaxlora.models.gemma_weights.config_from_hf` reads all of them from a ``config.json``.

    Attributes:
        rope_theta / rope_factor: RoPE base and linear scaling factor of full-attention layers
            (the inverse frequencies are divided by the factor).
        rope_local_theta / rope_local_factor: The same for sliding layers; ``None`` takes the
            full-attention value (Gemma 1/2 use one RoPE for all layers).
        query_pre_attn_scalar: Scores are multiplied by its ``-0.5`` power; ``None``: ``head_dim``.
        layer_types: One of :data:`FULL`, :data:`SLIDING` per layer; ``None``: all full.
        sandwich_norms: Gemma 2/3's extra norms around attention and the feed-forward.
        gelu_approximate: ``gelu`` with the tanh approximation (Hugging Face's
            ``gelu_pytorch_tanh``) or exact (``gelu`` in a Gemma 2/3 config).
    """

    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_local_theta: float | None = None
    rope_local_factor: float | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    sandwich_norms: bool = False
    qk_norm: bool = False
    gelu_approximate: bool = True
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, tuple):
            raise TypeError(
                f"`layer_types` must be a tuple (the config is hashable), got "
                f"{type(self.layer_types).__name__}; pass tuple(layer_types)"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_layers` is "
                f"{self.num_layers}; give one per layer"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (FULL, SLIDING):
                raise ValueError(
                    f"`layer_types[{i}]` is {kind!r}; expected {FULL!r} or {SLIDING!r}"
                )
        if SLIDING in self.layer_types and (self.sliding_window or 0) < 1:
            raise ValueError(
                f"`layer_types` has {SLIDING!r} layers but `sliding_window` is "
                f"{self.sliding_window}; set a positive window"
            )

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends to a sliding window only."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> tuple[float, float]:
        """``(theta, factor)`` of layer ``layer``'s rotary embedding."""
        if self.is_sliding(layer):
            theta = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
            factor = self.rope_factor if self.rope_local_factor is None else self.rope_local_factor
            return theta, factor
        return self.rope_theta, self.rope_factor


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def _rope(x: jax.Array, positions: jax.Array, theta: float, factor: float) -> jax.Array:
    """Rotate-half RoPE of ``x[batch, length, heads, head_dim]``; pair k is dims (k, k + D/2)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)) / factor
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # (b, len, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)
    return x * cos + rotated * sin


class GemmaRMSNorm(nn.Module):
    """RMSNorm computed in float32 with a zero-centred scale: ``x̂ · (1 + scale)``."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        gain = (1.0 + scale.astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + scale.shape)
        return (normed * gain).astype(x.dtype)


class GemmaAttention(nn.Module):
    """Grouped-query attention of layer ``layer`` (its RoPE, window and soft-cap)."""

    config: GemmaConfig
    layer: int

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        batch, length, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads

        def project(name: str, heads: int) -> jax.Array:
            y = nn.Dense(heads * cfg.head_dim, use_bias=False, name=name)(x)
            return y.reshape(batch, length, heads, cfg.head_dim)

        q, k = project("q_proj", cfg.num_heads), project("k_proj", cfg.num_kv_heads)
        v = project("v_proj", cfg.num_kv_heads)
        if cfg.qk_norm:
            q = GemmaRMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
            k = GemmaRMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
        theta, factor = cfg.rope(self.layer)
        q, k = _rope(q, positions, theta, factor), _rope(k, positions, theta, factor)
        written = None
        if cache is not None:
            written = cache.write(self.layer, k, v)
            k, v = written
        scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
        # Query head h reads key/value head h // groups, as Hugging Face's repeat_kv does.
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k.astype(q.dtype)) * float(scalar) ** -0.5
        scores = _softcap(scores, cfg.attn_logit_softcapping)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(q.dtype))
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="o_proj")(out), written


class GemmaMLP(nn.Module):
    """GeGLU feed-forward: ``down(gelu(gate(x)) * up(x))``."""

    config: GemmaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        hidden = nn.gelu(gate, approximate=cfg.gelu_approximate) * up
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(hidden)


class GemmaBlock(nn.Module):
    """One decoder block; Gemma 2/3 add norms after attention and around the feed-forward."""

    config: GemmaConfig
    layer: int

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.rms_norm_eps, name=name)

        h = norm("input_layernorm")(x)
        h, written = GemmaAttention(cfg, self.layer, name="self_attn")(h, positions, mask, cache)
        if cfg.sandwich_norms:
            x = x + norm("post_attention_layernorm")(h)
            h = GemmaMLP(cfg, name="mlp")(norm("pre_feedforward_layernorm")(x))
            return x + norm("post_feedforward_layernorm")(h), written
        x = x + h
        return x + GemmaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x)), written


def init_cache(
    config: GemmaConfig, batch: int, max_length: int, dtype: DTypeLike = jnp.float32
) -> KVCache:
    """An empty :class:`~jaxlora.models.kv_cache.KVCache` for ``GemmaForCausalLM(config)``.

    Example:
        >>> cfg = GemmaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=2,
        ...                   num_heads=2, num_kv_heads=1, head_dim=4)
        >>> init_cache(cfg, batch=1, max_length=6).keys[1].shape
        (1, 6, 1, 4)
    """
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
        >>> GemmaForCausalLM(cfg).apply({"params": params}, ids).shape
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
                :func:`~jaxlora.models.kv_cache.cache_positions` (each row's real tokens counted
                from 0, so left padding is handled).
            cache: A :class:`~jaxlora.models.kv_cache.KVCache` from :func:`init_cache`, or None.
        """
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
        if positions is None and cache is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        elif positions is None:
            positions = cache_positions(cache, valid)
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
        return _softcap(logits.astype(jnp.float32), self.config.final_logit_softcapping)

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
