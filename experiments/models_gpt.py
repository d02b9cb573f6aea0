"""A GPT-2-style decoder in Flax linen, the model of the jaxlora benchmarks.

Pre-LayerNorm blocks with separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` Dense layers
(so ``target_modules=["q_proj", "v_proj"]`` is PEFT's q,v setting), an MLP ``fc_in`` / ``fc_out``
with tanh-GELU, learned positions and an output head tied to the token embedding
(``Embed.attend``), so ``"all-linear"`` takes exactly the 6 Dense kernels of each block. The
defaults are the benchmark's size: d_model 768, 12 heads, 4 layers, MLP 3072, vocab 8192
(34.7M parameters). The PyTorch twin is in ``bench_peft.py``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8192
    d_model: int = 768
    heads: int = 12
    layers: int = 4
    mlp: int = 3072
    seq: int = 128


TINY = GPTConfig(vocab=64, d_model=32, heads=2, layers=2, mlp=64, seq=16)


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


def init(config: GPTConfig, key: jax.Array):
    """The model and its ``params``."""
    model = GPT(config)
    params = model.init(key, jnp.zeros((1, config.seq), jnp.int32))["params"]
    return model, params


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of the next token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
