"""A GPT-2-style decoder in Flax linen, the model of the jaxlora benchmarks.

Pre-LayerNorm blocks with separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` Dense layers
(so ``target_modules=["q_proj", "v_proj"]`` is PEFT's q,v setting), an MLP ``fc_in`` / ``fc_out``
with tanh-GELU, learned positions and an output head tied to the token embedding
(``Embed.attend``), so ``"all-linear"`` takes exactly the 6 Dense kernels of each block. The
defaults are the benchmark's size: d_model 768, 12 heads, 4 layers, MLP 3072, vocab 8192
(34.7M parameters). The PyTorch twin is in ``bench_peft.py``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.benchmarks import gpt_config

# The sizes live in a module without JAX, for the PyTorch side (``bench_peft.py``).
GPTConfig = gpt_config.GPTConfig
TINY = gpt_config.TINY


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        batch, seq, _ = x.shape
        h = nn.LayerNorm(name="ln_1")(x)
        split = lambda t: t.reshape(batch, seq, c.heads, c.d_model // c.heads)  # noqa: E731
        q = split(nn.Dense(c.d_model, name="q_proj")(h))
        k = split(nn.Dense(c.d_model, name="k_proj")(h))
        v = split(nn.Dense(c.d_model, name="v_proj")(h))
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + nn.Dense(c.d_model, name="o_proj")(attn.reshape(batch, seq, c.d_model))
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(nn.Dense(c.mlp, name="fc_in")(h), approximate=True)
        return x + nn.Dense(c.d_model, name="fc_out")(h)


class GPT(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab)."""

    config: GPTConfig = GPTConfig()

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(c.vocab, c.d_model, name="wte")
        positions = nn.Embed(c.seq, c.d_model, name="wpe")(jnp.arange(ids.shape[1]))
        x = embed(ids) + positions[None]
        for i in range(c.layers):
            x = Block(c, name=f"h_{i}")(x)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


def _layer_norm(x: jax.Array, p: dict, eps: float = 1e-6) -> jax.Array:
    """Flax's ``nn.LayerNorm`` (epsilon 1e-6, scale and bias) on the last axis."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    shape = (1,) * (x.ndim - 1) + (-1,)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"].reshape(shape) + p[
        "bias"].reshape(shape)  # fmt: skip


def _dense(x: jax.Array, p: dict) -> jax.Array:
    return x @ p["kernel"] + p["bias"].reshape((1,) * (x.ndim - 1) + (-1,))


def plain_gpt(params: dict, ids: jax.Array, config: GPTConfig) -> jax.Array:
    """:class:`GPT` as a plain JAX function of its own ``params`` dict (no Flax in the forward):
    the model of the benchmark's plain-JAX group, adapted by ``jaxlora.factored``."""
    c = config
    table = params["wte"]["embedding"]
    x = table[ids] + params["wpe"]["embedding"][: ids.shape[1]][None]
    batch, seq = ids.shape
    for i in range(c.layers):
        p = params[f"h_{i}"]
        h = _layer_norm(x, p["ln_1"])
        split = lambda t: t.reshape(batch, seq, c.heads, c.d_model // c.heads)  # noqa: E731
        q, k, v = (split(_dense(h, p[n])) for n in ("q_proj", "k_proj", "v_proj"))
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + _dense(attn.reshape(batch, seq, c.d_model), p["o_proj"])
        h = jax.nn.gelu(_dense(_layer_norm(x, p["ln_2"]), p["fc_in"]), approximate=True)
        x = x + _dense(h, p["fc_out"])
    return _layer_norm(x, params["ln_f"]) @ table.T


@functools.cache
def _jitted_init(model: nn.Module):
    """``model.init`` compiled once per model: run eagerly, each initialiser op is compiled and
    dispatched on its own (seconds for the benchmark's several builds of the same GPT)."""
    return jax.jit(model.init)


def init(config: GPTConfig, key: jax.Array):
    """The model and its ``params``."""
    model = GPT(config)
    params = _jitted_init(model)(key, jnp.zeros((1, config.seq), jnp.int32))["params"]
    return model, params


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of the next token: optax's integer-label cross-entropy, the library loss
    a JAX user reaches for, as ``bench_peft.py`` uses PyTorch's ``F.cross_entropy``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.mean(losses)


class AttentionBlock(nn.Module):
    """:class:`Block` with Flax's own ``nn.MultiHeadDotProductAttention`` (``DenseGeneral``
    projections ``attn/query|key|value|out``) in place of the four ``Dense`` layers."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        h = nn.LayerNorm(name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(c.heads, name="attn")(h, h, mask=mask)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.gelu(nn.Dense(c.mlp, name="fc_in")(h), approximate=True)
        return x + nn.Dense(c.d_model, name="fc_out")(h)


class AttentionGPT(nn.Module):
    """:class:`GPT` built from :class:`AttentionBlock` s (Flax's attention module, causal)."""

    config: GPTConfig = GPTConfig()

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(c.vocab, c.d_model, name="wte")
        positions = nn.Embed(c.seq, c.d_model, name="wpe")(jnp.arange(ids.shape[1]))
        x = embed(ids) + positions[None]
        mask = nn.make_causal_mask(ids)
        for i in range(c.layers):
            x = AttentionBlock(c, name=f"h_{i}")(x, mask)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


class NnxBlock(nnx.Module):
    """The NNX block: ``nnx.MultiHeadAttention`` (``LinearGeneral`` query/key/value/out) and an
    ``nnx.Linear`` MLP ``fc_in`` / ``fc_out``."""

    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(c.d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(c.heads, c.d_model, decode=False, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(c.d_model, rngs=rngs)
        self.fc_in = nnx.Linear(c.d_model, c.mlp, rngs=rngs)
        self.fc_out = nnx.Linear(c.mlp, c.d_model, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.fc_out(nnx.gelu(self.fc_in(self.ln_2(x)), approximate=True))


class NnxGPT(nnx.Module):
    """The benchmark GPT in Flax NNX (tied head through ``nnx.Embed.attend``)."""

    def __init__(self, c: GPTConfig, rngs: nnx.Rngs):
        self.wte = nnx.Embed(c.vocab, c.d_model, rngs=rngs)
        self.wpe = nnx.Embed(c.seq, c.d_model, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(c, rngs) for _ in range(c.layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.wte(ids) + self.wpe(jnp.arange(ids.shape[1]))[None]
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))


def init_attention(config: GPTConfig, key: jax.Array):
    """:class:`AttentionGPT` and its ``params``."""
    model = AttentionGPT(config)
    params = _jitted_init(model)(key, jnp.zeros((1, config.seq), jnp.int32))["params"]
    return model, params


def init_nnx(config: GPTConfig, seed: int = 0) -> NnxGPT:
    """A fresh :class:`NnxGPT`."""
    return NnxGPT(config, nnx.Rngs(seed))
