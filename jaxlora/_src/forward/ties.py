"""Ties: a value that XLA can neither compute early nor merge with an earlier copy of itself.

A tie adds a zero computed from an *anchor* (a value that exists only later in the program, such
as the cotangent arriving in a backward pass) to ``x``. The value is unchanged, but the tied copy
depends on the anchor, so a compiler cannot hoist it or share it with an earlier, identical
computation. Recomputation (:mod:`jaxlora.remat`), block-wise casting (``chunked``) and the
dequantising forward of a quantised base use it to keep big temporaries short-lived.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_float(x: Any) -> bool:
    """Whether ``x`` (an array, a scalar or an abstract value) has a float or complex dtype."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


@jax.custom_batching.custom_vmap
def _zero_from(value: jax.Array) -> jax.Array:
    return (value > jnp.inf).astype(jnp.int32)  # False even for NaN, so always 0


@_zero_from.def_vmap
def _zero_from_batched(axis_size, in_batched, value):
    # The zero is the same for every example: take it from the first one and keep it unbatched,
    # or a tied kernel would be copied once per example under jax.vmap.
    (batched,) = in_batched
    return _zero_from(value[0] if batched else value), False


def zero_from(anchor: Any) -> jax.Array | None:
    """An ``int32`` zero computed from ``anchor``'s first float element (None when ``anchor`` holds
    no float element). It stays 0 for inf and NaN, and stays unbatched under ``jax.vmap``."""
    floats = [a for a in jax.tree.leaves(anchor) if is_float(a) and jnp.size(a)]
    if not floats:
        return None
    return _zero_from(jnp.ravel(floats[0])[0])


def tie_to(x: jax.Array, anchor: Any) -> jax.Array:
    """``x`` plus a zero computed from ``anchor`` (:func:`zero_from`): same value, but it cannot be
    computed before ``anchor`` exists, and XLA cannot merge it with an earlier copy of ``x``.

    >>> import jax.numpy as jnp
    >>> tie_to(jnp.arange(3.0), jnp.array([jnp.nan])).tolist()
    [0.0, 1.0, 2.0]
    """
    zero = zero_from(anchor)
    return x if zero is None else x + zero.astype(x.dtype)
