"""The decoder block of :class:`~jaxlora.models.gemma.GemmaForCausalLM` and its building blocks.

:func:`softcap` (Gemma 2's ``cap · tanh(x / cap)``), :func:`rotate_half_rope`,
:class:`GemmaRMSNorm` (zero-centred, in float32), :class:`GemmaAttention`, :class:`GemmaMLP`
(GeGLU) and :class:`GemmaBlock` (with Gemma 2/3's sandwich norms).

Example:
    >>> import jax.numpy as jnp
    >>> softcap(jnp.array([0.0, 100.0]), 50.0).round(2).tolist()
    [0.0, 48.2]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models.decoding.kv_cache import KVCache
from jaxlora.models.gemma.config import GemmaConfig

__all__ = [
    "GemmaAttention",
    "GemmaBlock",
    "GemmaMLP",
    "GemmaRMSNorm",
    "rotate_half_rope",
    "softcap",
]


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)``, or ``x`` unchanged when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def rotate_half_rope(x: jax.Array, positions: jax.Array, theta: float, factor: float) -> jax.Array:
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
        q, k = (
            rotate_half_rope(q, positions, theta, factor),
            rotate_half_rope(k, positions, theta, factor),
        )
        written = None
        if cache is not None:
            written = cache.write(self.layer, k, v)
            k, v = written
        scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
        # Query head h reads key/value head h // groups, as Hugging Face's repeat_kv does.
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k.astype(q.dtype)) * float(scalar) ** -0.5
        scores = softcap(scores, cfg.attn_logit_softcapping)
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
