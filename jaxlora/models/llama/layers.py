"""The decoder block of :class:`~jaxlora.models.llama.LlamaForCausalLM` and its attention masks.

:class:`LlamaBlock` is pre-norm attention (:class:`LlamaAttention`, grouped-query, RoPE, optional
q/k norms and biases) and a SwiGLU feed-forward (:class:`LlamaMLP`). :func:`full_masks` and
:func:`cache_masks` give each layer its causal, padding and sliding-window mask.

Example:
    >>> from jaxlora.models.llama.config import LlamaConfig
    >>> cfg = LlamaConfig(num_layers=2, sliding_window=2, full_attention_layers=(1,))
    >>> masks = full_masks(cfg, 3, None)
    >>> masks[0][0, 0, 0].astype(int).tolist(), masks[1][0, 0, 0, 2].astype(int).tolist()
    ([[1, 0, 0], [1, 1, 0], [0, 1, 1]], [1, 1, 1])
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlora.models.decoding.kv_cache import KVCache
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.rope import apply_rope

__all__ = ["LlamaAttention", "LlamaBlock", "LlamaMLP", "cache_masks", "full_masks"]


class LlamaAttention(nn.Module):
    """Causal grouped-query attention: ``num_heads`` queries share ``num_kv_heads`` key/values."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns the output and, with ``cache``, this layer's updated key/value buffers."""
        cfg = self.config
        batch, length, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads

        def project(name: str, heads: int) -> jax.Array:
            y = nn.Dense(heads * cfg.head_dim, use_bias=cfg.qkv_bias, name=name)(x)
            y = y.reshape(batch, length, heads, cfg.head_dim)
            if cfg.qk_norm and name != "v_proj":
                # Qwen3: RMSNorm over each head's vector, before RoPE.
                y = nn.RMSNorm(epsilon=cfg.rms_norm_eps, name=name[0] + "_norm")(y)
            return y

        def rope(y: jax.Array) -> jax.Array:
            return apply_rope(y, positions, cfg.rope_theta, cfg.rope_interleaved, cfg.rope_scaling)

        q = rope(project("q_proj", cfg.num_heads))
        k = rope(project("k_proj", cfg.num_kv_heads))
        v = project("v_proj", cfg.num_kv_heads)
        kv = None
        if cache is not None:
            k, v = kv = cache.write(layer, k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        # Query head h reads key/value head h // groups, as Hugging Face's repeat_kv does.
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return nn.Dense(cfg.hidden_size, use_bias=cfg.o_proj_bias, name="o_proj")(out), kv


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=cfg.mlp_bias)
        gate = dense(cfg.intermediate_size, name="gate_proj")(x)
        up = dense(cfg.intermediate_size, name="up_proj")(x)
        return dense(cfg.hidden_size, name="down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One pre-norm decoder block."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        eps = self.config.rms_norm_eps
        h = nn.RMSNorm(epsilon=eps, name="input_layernorm")(x)
        attention = LlamaAttention(self.config, name="self_attn")
        attended, kv = attention(h, positions, mask, cache, layer)
        x = x + attended
        h = nn.RMSNorm(epsilon=eps, name="post_attention_layernorm")(x)
        return x + LlamaMLP(self.config, name="mlp")(h), kv


def _window(config: LlamaConfig, layer: int) -> int | None:
    if config.sliding_window is None or layer in config.full_attention_layers:
        return None
    return config.sliding_window


def full_masks(
    config: LlamaConfig, length: int, attention_mask: ArrayLike | None
) -> list[jax.Array]:
    """Per layer ``bool[batch|1, 1, 1, length, length]``: causal, padding and window masks."""
    query = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    masks = {}
    for window in {_window(config, i) for i in range(config.num_layers)}:
        seen = key <= query
        if window is not None:
            seen = seen & (query - key < window)
        mask = seen[None, None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, None, :]
        masks[window] = mask
    return [masks[_window(config, i)] for i in range(config.num_layers)]


def cache_masks(config: LlamaConfig, cache: KVCache, new_valid: jax.Array) -> list[jax.Array]:
    """Per layer ``bool[batch, 1, 1, T, max_length]`` for the new tokens."""
    windows = {_window(config, i) for i in range(config.num_layers)}
    masks = {w: cache.attention_mask(new_valid, w)[:, :, None] for w in windows}
    return [masks[_window(config, i)] for i in range(config.num_layers)]
