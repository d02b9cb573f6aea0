"""Plain LoRA (Hu et al., 2021) as a :class:`~jaxlora._src.variants.base.Variant`: ``W + s·A·B``.

A module holds ``lora_a`` (``stack + input + (r,)``) and ``lora_b`` (``stack + (r,) + output``) and
nothing else; it merges to ``W + s·A·B``, unmerges to ``W − s·A·B``, and on the factored path adds
``s·(drop(x)·A)·B`` to the layer's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora._src.types import LETTERS
from jaxlora._src.variants.base import Variant


def delta(a: jax.Array, b: jax.Array, n_stack: int = 0) -> jax.Array:
    """ΔW = A·B contracted over the rank axis, in float32, for stacked or plain factors.

    ``a`` has shape ``stack + input + (r,)`` and ``b`` ``stack + (r,) + output``; the result has
    shape ``stack + input + output``.

    Example:
        >>> import jax.numpy as jnp
        >>> delta(jnp.ones((3, 2)), jnp.ones((2, 4))).shape
        (3, 4)
    """
    _check_delta_factors(a, b, n_stack)
    n_in = a.ndim - 1 - n_stack
    n_out = b.ndim - 1 - n_stack
    stack, rest = LETTERS[:n_stack], LETTERS[n_stack + 1 :]
    ins, outs = rest[:n_in], rest[n_in : n_in + n_out]
    spec = f"{stack}{ins}{LETTERS[n_stack]},{stack}{LETTERS[n_stack]}{outs}->{stack}{ins}{outs}"
    return jnp.einsum(
        spec,
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )


def _check_delta_factors(a, b, n_stack: int) -> None:
    for name, x in (("a", a), ("b", b)):
        if not (hasattr(x, "shape") and hasattr(x, "ndim")):
            raise TypeError(f"`{name}` must be an array, got {type(x).__name__}")
    if isinstance(n_stack, bool) or not isinstance(n_stack, int) or n_stack < 0:
        raise ValueError(f"`n_stack` must be an int >= 0, got {n_stack!r}")
    ok = a.ndim >= n_stack + 2 and b.ndim >= n_stack + 2
    if ok and (a.shape[-1] != b.shape[n_stack] or a.shape[:n_stack] != b.shape[:n_stack]):
        ok = False
    if not ok:
        raise ValueError(
            f"`a` {tuple(a.shape)} and `b` {tuple(b.shape)} do not pair up with "
            f"`n_stack`={n_stack}: `a` must be stack + input + (r,) and `b` stack + (r,) + "
            "output, with the same rank r (a's last axis, b's axis after the stack) and the same "
            "stack axes"
        )


def add_delta(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_stack: int):
    """``W + scale·A·B``, computed in float32 and cast to W's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> add_delta(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), 0.5, 0)
        Array([[0.5, 0.5],
               [0.5, 0.5]], dtype=float32)
    """
    return (weight.astype(jnp.float32) + scale * delta(a, b, n_stack)).astype(weight.dtype)


class Lora(Variant):
    """Plain LoRA: no extra leaves; ``W + s·A·B``; factored ``layer(x) + s·(x·A)·B``.

    Example:
        >>> import jax.numpy as jnp
        >>> w, a, b = jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2))
        >>> merged = LORA.merge(w, a, b, {}, 2.0, 0, "m")
        >>> bool((LORA.unmerge(merged, a, b, {}, 2.0, 0, "m") == w).all())
        True
    """

    name = "lora"
    extra_leaves = ()
    fusable = True

    def init(self, target, weight, config):
        return {}

    def merge(self, weight, a, b, extras, scale, n_stack, where):
        return add_delta(weight, a, b, scale, n_stack)

    def unmerge(self, merged, a, b, extras, scale, n_stack, where):
        return add_delta(merged, a, b, -scale, n_stack)

    def factored(self, y, term, weight, bias, a, b, extras, scale):
        return y + term.astype(y.dtype)


#: The plain LoRA variant.
LORA = Lora()
