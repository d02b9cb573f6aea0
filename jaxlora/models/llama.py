"""A Llama-style decoder in Flax linen (GQA, RoPE, RMSNorm, SwiGLU) and greedy generation.

Every projection is a plain 2-D ``nn.Dense`` without bias; module paths follow Hugging Face's
``LlamaForCausalLM`` (``model.`` dropped)::

    embed_tokens, norm, lm_head (only if embeddings are untied)
    layers_{i}/input_layernorm, layers_{i}/post_attention_layernorm
    layers_{i}/self_attn/{q,k,v,o}_proj, layers_{i}/mlp/{gate,up,down}_proj

RoPE comes in two layouts. GGUF files store the q/k rows of each head permuted so that rotary
pairs are adjacent dimensions (0&1, 2&3, …); :attr:`LlamaConfig.rope_interleaved` = True matches
that. Hugging Face checkpoints pair dimension i with i + head_dim/2 ("rotate half"); set it False.
:func:`jaxlora.models.llama_weights.load_smollm2` can give either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["LlamaConfig", "LlamaForCausalLM", "apply_rope", "generate"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder; the defaults are those of SmolLM2-135M(-Instruct)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rope_interleaved: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, interleaved: bool) -> jax.Array:
    """Rotates ``x[batch, length, heads, head_dim]`` by its positions (rotary embedding).

    Pair k (frequency ``theta ** (-2k / head_dim)``) is dimensions (2k, 2k+1) if ``interleaved``,
    else (k, k + head_dim/2).
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # (b, len, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x[..., :half], x[..., half:]
    rotated_first = first * cos - second * sin
    rotated_second = first * sin + second * cos
    if interleaved:
        return jnp.stack([rotated_first, rotated_second], axis=-1).reshape(x.shape)
    return jnp.concatenate([rotated_first, rotated_second], axis=-1)


class LlamaAttention(nn.Module):
    """Causal grouped-query attention: ``num_heads`` queries share ``num_kv_heads`` key/values."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, _ = x.shape
        groups = cfg.num_heads // cfg.num_kv_heads

        def project(name: str, heads: int) -> jax.Array:
            y = nn.Dense(heads * cfg.head_dim, use_bias=False, name=name)(x)
            return y.reshape(batch, length, heads, cfg.head_dim)

        q = apply_rope(
            project("q_proj", cfg.num_heads), positions, cfg.rope_theta, cfg.rope_interleaved
        )
        k = apply_rope(
            project("k_proj", cfg.num_kv_heads), positions, cfg.rope_theta, cfg.rope_interleaved
        )
        v = project("v_proj", cfg.num_kv_heads)
        # Query head h reads key/value head h // groups, as Hugging Face's repeat_kv does.
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="o_proj")(out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """One pre-norm decoder block."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.rms_norm_eps
        h = nn.RMSNorm(epsilon=eps, name="input_layernorm")(x)
        x = x + LlamaAttention(self.config, name="self_attn")(h, positions, mask)
        h = nn.RMSNorm(epsilon=eps, name="post_attention_layernorm")(x)
        return x + LlamaMLP(self.config, name="mlp")(h)


class LlamaForCausalLM(nn.Module):
    """Token ids in, next-token logits ``float32[batch, length, vocab]`` out.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=4)
        >>> ids = jnp.ones((1, 6), jnp.int32)
        >>> params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
        >>> LlamaForCausalLM(cfg).apply({"params": params}, ids).shape
        (1, 6, 32)
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

    def hidden_states(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
    ) -> jax.Array:
        """The final normalised hidden states ``float32[batch, length, hidden]``.

        Args:
            input_ids: ``int[batch, length]``.
            attention_mask: 1 for tokens to attend to, 0 for padding; defaults to all ones.
                Attention is causal in any case.
            positions: RoPE positions; defaults to ``0 … length-1`` in every row.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, None, :]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, jnp.asarray(positions), mask)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Projects hidden states onto the vocabulary (the tied embedding, or ``lm_head``)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: ArrayLike,
        attention_mask: ArrayLike | None = None,
        positions: ArrayLike | None = None,
    ) -> jax.Array:
        """Returns next-token logits; arguments as :meth:`hidden_states`."""
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))


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
        next_token = jnp.argmax(
            model.apply({"params": params}, last, method=LlamaForCausalLM.logits)[:, 0], axis=-1
        ).astype(jnp.int32)
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
    :mod:`jaxlora.models.llama_weights` (e.g. :func:`~jaxlora.models.llama_weights.chat_prompt`).

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
        ValueError: If ``prompt_ids`` is empty or not 1-D/2-D, or ``max_new_tokens < 1``.
    """
    prompt = jnp.asarray(prompt_ids, dtype=jnp.int32)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(
            f"`prompt_ids` must be non-empty (length,) or (batch, length), got shape {prompt.shape}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}")
    eos = config.eos_token_id if eos_id is None else eos_id
    out = _greedy(params, config, jnp.atleast_2d(prompt), max_new_tokens, eos)
    return out[0] if prompt.ndim == 1 else out
