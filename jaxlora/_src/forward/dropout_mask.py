"""LoRA dropout's keep-masks: a counter-based hash XLA fuses into a few integer ops per entry.

The fused dense layer (:mod:`~jaxlora._src.forward.fused`) and the general factored path apply
the same masks: :func:`keep_mask` draws one from a key, :func:`apply_mask` applies it (inverted
dropout) to the LoRA branch's input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit avalanche mix (MurmurHash3's finaliser): every output bit depends on every input
    bit, and distinct inputs give distinct outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """The boolean keep-mask of inverted dropout at ``rate`` (True: the entry is kept).

    Each entry's 32 random bits are a hash of its position, seeded by two words drawn from ``key``
    with ``jax.random``: a counter-based generator that XLA fuses into a few integer ops per
    entry. ``jax.random.bernoulli`` (threefry) costs ~20 ns per entry on XLA:CPU, which made LoRA
    dropout cost a quarter of a full fine-tuning step on the benchmark GPT; this is ~25x cheaper
    (``experiments/results/optimisation_notes.md``). The same key gives the same mask; the
    fraction dropped is ``rate`` to within 2^-32, and neighbouring entries are uncorrelated.

    Example:
        >>> import jax
        >>> mask = keep_mask(jax.random.key(0), 0.25, (1000, 100))
        >>> round(float(mask.mean()), 2)
        0.75
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    position = lax.iota(jnp.uint32, math.prod(shape))
    bits = _mix(_mix(position * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    return (bits >= threshold).reshape(shape)


def apply_mask(x: jax.Array, keep: jax.Array | None, rate: float) -> jax.Array:
    """``x`` with dropped entries zeroed and kept ones scaled by ``1 / (1 - rate)``."""
    if keep is None:
        return x
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
