"""A key/value cache for decoder models, as a pytree that passes through ``jax.jit``.

:class:`KVCache` holds, for each layer, the keys and values of every token seen so far in fixed
buffers ``[batch, max_length, num_kv_heads, head_dim]``, plus ``valid`` (``bool[batch,
max_length]``: the slot holds a real token, not left padding) and ``length`` (``int32`` scalar: the
slots written so far, shared by all rows; left-pad prompts to one length).

One model call with T new tokens does, in order:

1. ``mask = cache.attention_mask(new_valid)`` -- ``bool[batch, 1, T, max_length]``: query t (slot
   ``length + t``) sees slot j iff ``j <= length + t`` and slot j is valid once the new tokens'
   ``new_valid`` is written (and, with ``window``, ``length + t - j < window``);
2. per layer ``keys, values = cache.write(layer, k, v)``: that layer's whole buffers with the new
   ``[batch, T, kv_heads, head_dim]`` entries at slots ``[length, length + T)``;
3. ``cache.advance(all_keys, all_values, new_valid)``: the next cache, ``length + T``.

Writing past ``max_length`` is not checked under ``jit`` (``dynamic_update_slice`` clamps the
start); size the cache for prompt plus new tokens.

Example:
    >>> import jax.numpy as jnp
    >>> cache = KVCache.init(1, batch=1, max_length=4, num_kv_heads=1, head_dim=2)
    >>> k = jnp.ones((1, 2, 1, 2))
    >>> keys, values = cache.write(0, k, k)
    >>> mask = cache.attention_mask(jnp.array([[False, True]]))
    >>> mask[0, 0].astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 0, 0]]
    >>> int(cache.advance((keys,), (values,), jnp.array([[False, True]])).length)
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import ArrayLike, DTypeLike

from jaxlora._src import validate

__all__ = ["KVCache", "cache_positions"]


class KVCache(struct.PyTreeNode):
    """Per-layer key/value buffers, the slots' validity and the number of slots written."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @classmethod
    def init(
        cls,
        num_layers: int,
        batch: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: DTypeLike = jnp.float32,
    ) -> KVCache:
        """An empty cache: zero buffers, no valid slot, ``length`` 0."""
        for name, value in (
            ("num_layers", num_layers),
            ("batch", batch),
            ("max_length", max_length),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        check_cache_dtype(dtype, "dtype")
        shape = (batch, max_length, num_kv_heads, head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(
            keys=zeros,
            values=zeros,
            valid=jnp.zeros((batch, max_length), bool),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        """The number of slots."""
        return self.valid.shape[1]

    def write(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Layer ``layer``'s buffers with ``k``, ``v`` (``[batch, T, heads, dim]``) at slot
        ``length``."""
        if not 0 <= layer < len(self.keys):
            raise ValueError(f"`layer` must be in [0, {len(self.keys)}), got {layer}")
        buffer = self.keys[layer]
        batch, _, heads, dim = buffer.shape
        for name, new in (("k", k), ("v", v)):
            if new.ndim != 4 or (new.shape[0], *new.shape[2:]) != (batch, heads, dim):
                raise ValueError(
                    f"`{name}` must be [batch, T, num_kv_heads, head_dim] matching the cache's "
                    f"{buffer.shape}, got {new.shape}"
                )
        start = (0, self.length, 0, 0)
        keys = jax.lax.dynamic_update_slice(buffer, k.astype(buffer.dtype), start)
        values = jax.lax.dynamic_update_slice(
            self.values[layer], v.astype(self.values[layer].dtype), start
        )
        return keys, values

    def _valid_after(self, new_valid: ArrayLike) -> jax.Array:
        new_valid = jnp.asarray(new_valid).astype(bool)
        if new_valid.ndim != 2 or new_valid.shape[0] != self.valid.shape[0]:
            raise ValueError(
                f"`new_valid` must be bool[batch={self.valid.shape[0]}, T], got {new_valid.shape}"
            )
        return jax.lax.dynamic_update_slice(self.valid, new_valid, (0, self.length))

    def attention_mask(self, new_valid: ArrayLike, window: int | None = None) -> jax.Array:
        """``bool[batch, 1, T, max_length]``: which slots each of the T new queries sees.

        Args:
            new_valid: ``bool[batch, T]``, False for the new tokens that are left padding.
            window: If set, query slot p sees only slots j with ``p - j < window`` (sliding-window
                attention, as Mistral's ``sliding_window``).
        """
        valid = self._valid_after(new_valid)
        steps = jnp.asarray(new_valid).shape[1]
        query = self.length + jnp.arange(steps, dtype=jnp.int32)[:, None]
        slot = jnp.arange(self.max_length, dtype=jnp.int32)[None, :]
        seen = slot <= query
        if window is not None:
            seen = seen & (query - slot < window)
        return (seen[None] & valid[:, None, :])[:, None]

    def advance(
        self, keys: Sequence[jax.Array], values: Sequence[jax.Array], new_valid: ArrayLike
    ) -> KVCache:
        """The cache after T new tokens: the layers' new buffers, ``valid`` and ``length + T``."""
        if len(keys) != len(self.keys) or len(values) != len(self.values):
            raise ValueError(
                f"`keys` and `values` need one buffer per layer ({len(self.keys)}), got "
                f"{len(keys)} and {len(values)}"
            )
        steps = jnp.asarray(new_valid).shape[1]
        return self.replace(
            keys=tuple(keys),
            values=tuple(values),
            valid=self._valid_after(new_valid),
            length=self.length + jnp.int32(steps),
        )


def cache_positions(cache: KVCache, new_valid: ArrayLike) -> jax.Array:
    """RoPE positions of the new tokens: real tokens so far plus ``cumsum(new_valid) - 1``.

    With left padding this numbers each row's real tokens 0, 1, 2, … (padding gets 0), as Hugging
    Face does for a left-padded batch.
    """
    if not isinstance(cache, KVCache):
        raise validate.fail_type("cache", "a KVCache", cache)
    validate.array_like("new_valid", new_valid, ndim=2)
    new_valid = jnp.asarray(new_valid).astype(jnp.int32)
    seen = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
    return jnp.maximum(seen + jnp.cumsum(new_valid, axis=1) - 1, 0)


def check_cache_dtype(dtype: Any, argument: str) -> None:
    """Cached keys and values are floating point: an integer dtype would round every key and
    value to whole numbers and generation would go on, producing nonsense."""
    try:
        if dtype is None:  # jnp.dtype(None) is NumPy's default float64
            raise TypeError
        resolved = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{argument}` must be a floating dtype (float32, bfloat16, float16), got {dtype!r:.60}"
        ) from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"`{argument}` must be a floating dtype (float32, bfloat16, float16), got "
            f"{resolved.name}"
        )
