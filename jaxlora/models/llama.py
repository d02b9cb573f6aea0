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

The config also covers the rest of the family that :func:`jaxlora.models.hf_llama.load_hf` reads:
q/k/v (and o) biases (Qwen2), per-head q/k RMS norms (Qwen3), Llama 3.x RoPE scaling
(:class:`Llama3RopeScaling`) and sliding-window attention (Mistral). Each defaults to off.

Passing a :class:`~jaxlora.models.kv_cache.KVCache` (from :func:`init_cache`) as ``cache=`` makes
the model process only the new tokens and return ``(logits, new_cache)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxlora.models.kv_cache import KVCache, cache_positions

__all__ = [
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "apply_rope",
    "generate",
    "init_cache",
    "rope_frequencies",
]


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (Hugging Face ``rope_type: "llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``; shorter than ``… / high_freq_factor`` kept; in between, interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"`high_freq_factor` ({self.high_freq_factor}) must exceed `low_freq_factor` "
                f"({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder; the defaults are those of SmolLM2-135M(-Instruct).

    The family features (all off by default) are: ``qkv_bias`` (biases on q/k/v, Qwen2; with
    ``o_proj_bias`` Llama's ``attention_bias``), ``mlp_bias``, ``qk_norm`` (RMSNorm over each
    head of q and k before RoPE, Qwen3), ``rope_scaling`` (Llama 3.x) and ``sliding_window``
    (query p sees keys p - window < j <= p, Mistral), which the layers listed in
    ``full_attention_layers`` do not use (Qwen's per-layer ``layer_types``).
    """

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
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"`sliding_window` must be None or >= 1, got {self.sliding_window}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for RoPE, got {self.head_dim}")


def rope_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
    """``float32[head_dim/2]``: pair k turns by ``theta ** (-2k / head_dim)`` per position.

    With ``scaling`` the low frequencies are slowed down as Llama 3.1 does.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    wavelength = 2.0 * jnp.pi / inv_freq
    context = scaling.original_max_position_embeddings
    slowed = inv_freq / scaling.factor
    # 0 at the long-wavelength edge, 1 at the short one.
    blend = (context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    medium = (1.0 - blend) * slowed + blend * inv_freq
    out = jnp.where(wavelength > context / scaling.low_freq_factor, slowed, inv_freq)
    in_between = (wavelength >= context / scaling.high_freq_factor) & (
        wavelength <= context / scaling.low_freq_factor
    )
    return jnp.where(in_between, medium, out)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float,
    interleaved: bool,
    scaling: Llama3RopeScaling | None = None,
) -> jax.Array:
    """Rotates ``x[batch, length, heads, head_dim]`` by its positions (rotary embedding).

    Pair k (frequency :func:`rope_frequencies`) is dimensions (2k, 2k+1) if ``interleaved``,
    else (k, k + head_dim/2).
    """
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(x.shape[-1], theta, scaling)
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


def _full_masks(
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


def _cache_masks(config: LlamaConfig, cache: KVCache, new_valid: jax.Array) -> list[jax.Array]:
    """Per layer ``bool[batch, 1, 1, T, max_length]`` for the new tokens."""
    windows = {_window(config, i) for i in range(config.num_layers)}
    masks = {w: cache.attention_mask(new_valid, w)[:, :, None] for w in windows}
    return [masks[_window(config, i)] for i in range(config.num_layers)]


class LlamaForCausalLM(nn.Module):
    """Token ids in, next-token logits ``float32[batch, length, vocab]`` out.

    With ``cache=`` (a :class:`~jaxlora.models.kv_cache.KVCache` from :func:`init_cache`) the
    call processes only the new tokens and returns ``(logits, new_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
        ...                   num_heads=4, num_kv_heads=2, head_dim=4)
        >>> ids = jnp.ones((1, 6), jnp.int32)
        >>> params = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"]
        >>> LlamaForCausalLM(cfg).apply({"params": params}, ids).shape
        (1, 6, 32)
        >>> logits, cache = LlamaForCausalLM(cfg).apply(
        ...     {"params": params}, ids, cache=init_cache(cfg, batch=1, max_length=8))
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
                :func:`~jaxlora.models.kv_cache.cache_positions`, which counts only real tokens).
            cache: If given, ``input_ids`` are the next tokens after those in the cache; the
                result is then ``(hidden, new_cache)``.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be (batch, length), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
            masks = _full_masks(self.config, length, attention_mask)
        else:
            new_valid = (
                jnp.ones(input_ids.shape, bool)
                if attention_mask is None
                else jnp.asarray(attention_mask) > 0
            )
            if positions is None:
                positions = cache_positions(cache, new_valid)
            masks = _cache_masks(self.config, cache, new_valid)
        x = self.embed_tokens(input_ids)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, jnp.asarray(positions), masks[i], cache, i)
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
        if cache is None:
            return self.norm(x)
        return self.norm(x), cache.advance(keys, values, new_valid)

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
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Returns next-token logits (and the new cache); arguments as :meth:`hidden_states`."""
        if cache is None:
            return self.logits(self.hidden_states(input_ids, attention_mask, positions))
        hidden, cache = self.hidden_states(input_ids, attention_mask, positions, cache)
        return self.logits(hidden), cache


def init_cache(
    config: LlamaConfig, batch: int, max_length: int, dtype: DTypeLike = jnp.float32
) -> KVCache:
    """An empty :class:`~jaxlora.models.kv_cache.KVCache` sized for ``config``'s layers."""
    return KVCache.init(
        config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim, dtype
    )


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
