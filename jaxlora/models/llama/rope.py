"""Rotary position embedding (RoPE) for :mod:`jaxlora.models.llama`, with Llama 3.1's scaling.

RoPE comes in two layouts. GGUF files store the q/k rows of each head permuted so that rotary
pairs are adjacent dimensions (0&1, 2&3, …): ``interleaved=True``. Hugging Face checkpoints pair
dimension i with i + head_dim/2 ("rotate half"): ``interleaved=False``.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 2, 4))
    >>> y = apply_rope(x, jnp.arange(3)[None], theta=10000.0, interleaved=False)
    >>> y.shape, bool(jnp.allclose(y[:, 0], x[:, 0]))
    ((1, 3, 2, 4), True)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlora._src import validate

__all__ = ["Llama3RopeScaling", "apply_rope", "rope_frequencies"]


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
        validate.dataclass_fields(self)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"`high_freq_factor` ({self.high_freq_factor}) must exceed `low_freq_factor` "
                f"({self.low_freq_factor})"
            )


def rope_frequencies(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> jax.Array:
    """``float32[head_dim/2]``: pair k turns by ``theta ** (-2k / head_dim)`` per position.

    With ``scaling`` the low frequencies are slowed down as Llama 3.1 does.
    """
    if validate.positive_int("head_dim", head_dim) % 2:
        raise ValueError(f"`head_dim` must be even for RoPE, got {head_dim}")
    if not validate.is_traced(theta):
        validate.number("theta", theta, above=0.0)
    if scaling is not None and not isinstance(scaling, Llama3RopeScaling):
        raise validate.fail_type("scaling", "a Llama3RopeScaling or None", scaling)
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
    validate.array("x", x, floating=True, min_ndim=2)
    validate.array_like("positions", positions, min_ndim=1, nonempty=True)
    validate.boolean("interleaved", interleaved)
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
