"""Array-level low-rank terms ``s·(x·A)·B`` for each layer kind, shared by the linen and NNX paths.

Each function takes the layer input and the (per-layer, unstacked) factors and returns the term to
add to the layer's output, never forming ΔW: the rank-r intermediate is scaled (it is the smallest
tensor) and then projected by B.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.config import axes_order
from jaxlora._src.types import LETTERS


def _factor_shapes(layout: str, kernel_shape: tuple[int, ...], rank: Any) -> tuple[tuple, tuple]:
    """The ``(lora_a, lora_b)`` shapes for a kernel whose axes ``layout`` names, in canonical
    order: stack + window + input + ``(rank,)`` and stack + ``(rank,)`` + output."""
    shape = axes_order.canonical_shape(tuple(kernel_shape), layout)
    split = len(shape) - layout.count("o")
    return shape[:split] + (rank,), shape[: layout.count("s")] + (rank,) + shape[split:]


def check_factors(where: str, layout: str, kernel_shape: tuple[int, ...], a: Any, b: Any) -> None:
    """Checks that ``a`` / ``b`` fit a kernel whose axes the layer itself describes by ``layout``
    (any order: the factors take the canonical one, stack + window + input + output).

    Raises:
        ValueError: naming the module, the shapes expected from the layer and those found.
    """
    a_want, b_want = _factor_shapes(layout, kernel_shape, a.shape[-1] if a.ndim else None)
    if tuple(a.shape) != a_want or tuple(b.shape) != b_want:
        raise ValueError(
            f"the factors at `{where}` do not fit the layer: its kernel {tuple(kernel_shape)} has "
            f"axes {layout!r}, so `lora_a` should be {a_want} and `lora_b` {b_want}, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}; was the adapter split with another "
            "`LoraConfig.layouts`?"
        )


def check_plain_conv(where: str, feature_group_count: int, mask: Any) -> None:
    """The factored path adapts plain convolutions only (one feature group, no kernel mask).

    Raises:
        ValueError: naming the layer and what makes it unsupported.
    """
    if feature_group_count != 1 or mask is not None:
        raise ValueError(
            f"the factored path cannot adapt the Conv at `{where}`: it has "
            f"`feature_group_count`={feature_group_count} and "
            f"`mask`={'set' if mask is not None else None}; only plain convolutions "
            "(groups 1, no mask) are supported; use `mode='merged'` for this model"
        )


def project(h: jax.Array, b: jax.Array, n_batch: int, precision: Any) -> jax.Array:
    """``h·B``: contracts the last (rank) axis of ``h`` with ``b``'s rank axis.

    The first ``n_batch`` axes of both are batch axes; the result is
    ``batch + h's other axes + B's output axes``.
    """
    batch = tuple(range(n_batch))
    return lax.dot_general(h, b, (((h.ndim - 1,), (n_batch,)), (batch, batch)), precision=precision)


def dot(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    contract: tuple[int, ...],
    batch: tuple[int, ...],
    precision: Any,
) -> jax.Array:
    """``s·(x·A)·B`` for a ``DenseGeneral`` contracting ``contract`` with batch axes ``batch``.

    ``a`` has shape ``batch + contracted + (r,)``, ``b`` ``batch + (r,) + features``.

    Example:
        >>> import jax.numpy as jnp
        >>> x, a, b = jnp.ones((2, 4)), jnp.ones((4, 1)), jnp.ones((1, 3))
        >>> dot(x, a, b, 0.5, (1,), (), None)
        Array([[2., 2., 2.],
               [2., 2., 2.]], dtype=float32)
    """
    n_batch, n_in = len(batch), len(contract)
    a_contract = tuple(range(n_batch, n_batch + n_in))
    a_batch = tuple(range(n_batch))
    h = lax.dot_general(x, a, ((contract, a_contract), (batch, a_batch)), precision=precision)
    return project(h * scale, b, n_batch, precision)


def _check_einsum(where, spec, kernel_layout, layout, kernel_shape, a, b) -> None:
    """Checks that the factors of an Einsum kernel fit the layout its ``spec`` gives it."""
    problem = axes_order.layout_problem(kernel_layout)
    fitted = axes_order.for_ndim(layout, len(kernel_layout)) if layout else None
    if problem is None and fitted is not None and fitted != kernel_layout:
        problem = f"the adapter was split with `layouts` {layout!r}"
    if problem is None:
        a_want, b_want = _factor_shapes(
            kernel_layout, kernel_shape, a.shape[-1] if a.ndim else None
        )
        if tuple(a.shape) != a_want or tuple(b.shape) != b_want:
            problem = (
                f"its factors should be `lora_a` {a_want} and `lora_b` {b_want}, got "
                f"{tuple(a.shape)} and {tuple(b.shape)}: was the adapter split with other "
                "`LoraConfig.layouts`?"
            )
    if problem is not None:
        raise ValueError(
            f"the factored path cannot split the Einsum kernel at `{where}`: `einsum_str`={spec!r} "
            f"gives kernel axes {kernel_layout!r} (batch 's', contracted 'i', output 'o', summed "
            f"'?'), and {problem}; use `mode='merged'` or fix `LoraConfig.layouts`"
        )


def einsum(
    where: str,
    spec: str,
    kernel_shape: tuple[int, ...],
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    precision: Any,
    preferred_element_type: Any = None,
    *,
    layout: str | None = None,
) -> jax.Array:
    """``s·(x·A)·B`` for ``einsum(spec, x, kernel)``, whatever the order of the kernel's axes.

    The kernel's letters are read as batch ``s`` (in x and the output: they must lead the
    kernel), contracted ``i`` (in x only) and output ``o`` (in the output only); ``a`` holds the
    batch then contracted letters in kernel order and the rank, ``b`` the batch letters, the rank,
    then the output letters in kernel order (the canonical order :func:`jaxlora.merge` uses).

    Args:
        layout: the layout the adapter was split with (``LoraConfig.layouts``), if known; it
            must agree with the one ``spec`` gives (leading ``s`` of a stacked kernel aside).

    Raises:
        ValueError: when ``spec`` sums a kernel axis away, puts a batch axis after another kind,
            disagrees with ``layout``, or the factors do not fit.

    Example:
        >>> import jax.numpy as jnp
        >>> x, a, b = jnp.ones((1, 4)), jnp.ones((4, 1)), jnp.ones((1, 2, 3))
        >>> einsum("q", "bd,hdk->bhk", (2, 4, 3), x, a, b, 0.5, None).shape
        (1, 2, 3)
    """
    spec = spec.replace(" ", "")
    kernel_layout = axes_order.einsum_layout(spec)
    _check_einsum(where, spec, kernel_layout, layout, kernel_shape, a, b)
    inputs, out = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    rank = next(c for c in LETTERS if c not in spec)
    letters = "".join(k_spec[k] for k in axes_order.canonical_perm(kernel_layout))
    n_stack, n_out = kernel_layout.count("s"), kernel_layout.count("o")
    a_spec = letters[: len(letters) - n_out] + rank
    b_spec = letters[:n_stack] + rank + letters[len(letters) - n_out :]
    h_spec = "".join(c for c in x_spec if c == "." or c in out) + rank
    h = jnp.einsum(f"{x_spec},{a_spec}->{h_spec}", x, a, precision=precision)
    return jnp.einsum(
        f"{h_spec},{b_spec}->{out}",
        h * scale,
        b,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def embed(ids: jax.Array, a: jax.Array, b: jax.Array, scale: float, precision: Any) -> jax.Array:
    """``s·A[ids]·B``: the rows of A for the token ids, projected by B."""
    h = jnp.take(a, ids, axis=0)
    return project(h * scale, b, 0, precision)


def attend(query: jax.Array, a: jax.Array, b: jax.Array, scale: float, precision: Any) -> jax.Array:
    """``s·(q·Bᵀ)·Aᵀ``, the low-rank part of ``q·(E + s·A·B)ᵀ`` (a tied output head)."""
    h = lax.dot_general(query, b, (((query.ndim - 1,), (1,)), ((), ())), precision=precision)
    return lax.dot_general(h * scale, a, (((h.ndim - 1,), (1,)), ((), ())), precision=precision)
