"""Small linen models covering every kernel kind jaxlora adapts, for the core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB, DIM, HEADS, LAYERS, SEQ = 32, 16, 2, 3, 5


class Block(nn.Module):
    """Attention (DenseGeneral q/k/v/out) and a two-layer MLP."""

    @nn.compact
    def __call__(self, x, _=None):
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x)
        h = nn.gelu(nn.Dense(2 * DIM, name="fc1")(x))
        return x + nn.Dense(DIM, name="fc2")(h), None


class Decoder(nn.Module):
    """Embedding, a stack of blocks (scanned or unrolled) and an output head."""

    scan: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        if self.scan:
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=LAYERS,
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(LAYERS):
                x, _ = Block(name=f"layer_{i}")(x)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.Conv(4, (3, 3), name="conv2")(x)
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def ids(batch=2):
    return jax.random.randint(jax.random.key(7), (batch, SEQ), 0, VOCAB)


def images(batch=2):
    return jax.random.normal(jax.random.key(8), (batch, 6, 6, 3))


def init(model, x, dtype=jnp.float32):
    # Jitted: an eager init compiles every op on its own (seconds per model, per test).
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)
