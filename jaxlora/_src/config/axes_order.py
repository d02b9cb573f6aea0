"""The order of a kernel's axes: the layout grammar and the map to the factors' canonical order.

A layout names each kernel axis, in the kernel's own order: ``s`` stacked (``nn.scan`` /
``nn.vmap`` layers, an Einsum batch axis), ``w`` window (conv spatial), ``i`` input (contracted
with the layer input), ``o`` output. The rules:

* stacked axes lead (``nn.scan`` / ``nn.vmap`` put them there with the default
  ``variable_axes`` 0), so that a layer's slice of a stacked kernel is ``kernel[index]``;
* window, input and output axes come in any order after them, with at least one input and one
  output axis: ``"io"`` Dense, ``"ioo"`` linen attention query, ``"oio"`` a Gemma-style query
  einsum ``(heads, d_model, head_dim)``, ``"ooio"`` a fused kv einsum, ``"sioo"`` scanned.

The adapter's factors never follow the kernel's order: they keep the *canonical* one, stack +
window + input + output (each group in its kernel order), so ``lora_a`` is
``stack + window + input + (r,)`` and ``lora_b`` ``stack + (r,) + output`` whatever the layout.
:func:`canonical_perm` is the transpose from the kernel's order to the canonical one; merging
permutes W to it, folds, and permutes the result back (:func:`from_canonical`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from jaxlora._src import paths

#: Supported layouts: leading stacked axes, then window / input / output axes in any order, with
#: at least one input and one output axis.
LAYOUT_PATTERN = re.compile(r"s*(?=[wio]*i)(?=[wio]*o)[wio]+")
#: The canonical order of the letters: the order of the axes of ``lora_a`` then ``lora_b``.
CANONICAL = "swio"


def layout_problem(layout: Any) -> str | None:
    """Why ``layout`` is not a layout string, or None when it is one.

    Example:
        >>> layout_problem("oio") is None, layout_problem("iso")
        (True, "its stacked axes 's' must lead the kernel's axes")
    """
    if not isinstance(layout, str):
        return f"it is a {type(layout).__name__}, not a string"
    unknown = sorted(set(layout) - set(CANONICAL))
    if unknown:
        return f"it has letters {unknown}; the letters are 's', 'w', 'i' and 'o'"
    if "s" in layout.lstrip("s"):
        return "its stacked axes 's' must lead the kernel's axes"
    if "i" not in layout or "o" not in layout:
        return "it needs at least one input axis 'i' and one output axis 'o'"
    return None


def canonical_perm(layout: str) -> tuple[int, ...]:
    """The kernel axes in canonical order: stack, window, input, output (stable within each).

    ``kernel.transpose(canonical_perm(layout))`` is the kernel in the factors' order.

    Example:
        >>> canonical_perm("oio"), canonical_perm("sioo")
        ((1, 0, 2), (0, 1, 2, 3))
    """
    return tuple(sorted(range(len(layout)), key=lambda k: CANONICAL.index(layout[k])))


def canonical_layout(layout: str) -> str:
    """``layout`` with its letters in canonical order (``"oio"`` -> ``"ioo"``)."""
    return "".join(layout[k] for k in canonical_perm(layout))


def is_canonical(layout: str) -> bool:
    """Whether the kernel's axes already are in the factors' order (no transpose needed)."""
    return canonical_layout(layout) == layout


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``.

    Example:
        >>> inverse((2, 0, 1))
        (1, 2, 0)
    """
    out = [0] * len(perm)
    for position, axis in enumerate(perm):
        out[axis] = position
    return tuple(out)


def canonical_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The kernel's shape in canonical order.

    Example:
        >>> canonical_shape((4, 16, 8), "oio")
        (16, 4, 8)
    """
    return tuple(shape[k] for k in canonical_perm(layout))


def to_canonical(x: Any, layout: str) -> Any:
    """The kernel ``x`` (laid out by ``layout``; an array or a ``jax.ShapeDtypeStruct``)
    transposed to canonical order."""
    if is_canonical(layout):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(canonical_shape(tuple(x.shape), layout), x.dtype)
    return x.transpose(canonical_perm(layout))


def from_canonical(x: Any, layout: str) -> Any:
    """The inverse of :func:`to_canonical`: a canonical-order array back in kernel order."""
    return x if is_canonical(layout) else x.transpose(inverse(canonical_perm(layout)))


def for_ndim(layout: str, ndim: int) -> str | None:
    """``layout`` for a kernel of ``ndim`` axes: the full layout, or the layout of one layer's
    slice of a stacked kernel (leading ``s`` dropped); None when neither fits.

    Example:
        >>> for_ndim("soio", 4), for_ndim("soio", 3), for_ndim("oio", 4)
        ('soio', 'oio', None)
    """
    extra = len(layout) - ndim
    if extra < 0 or layout[:extra] != "s" * extra:
        return None
    return layout[extra:]


def einsum_layout(spec: str) -> str:
    """The kernel letters of ``einsum(spec, x, kernel)``: ``s`` for a letter of x, kernel and
    output (a batch axis), ``i`` for one of x and kernel (contracted), ``o`` for one of kernel and
    output, ``?`` for one of the kernel alone (summed over; no layout has it).

    Example:
        >>> einsum_layout("btd,ndh->btnh")
        'oio'
    """
    inputs, out = spec.replace(" ", "").split("->")
    x_spec, k_spec = inputs.split(",")
    return "".join(
        ("s" if c in out else "i") if c in x_spec else ("o" if c in out else "?") for c in k_spec
    )


def trailing_contraction(spec: str, x_ndim: int | None = None) -> int | None:
    """How many trailing axes of x ``einsum(spec, x, kernel)`` contracts, when the einsum is a
    dense layer on them (x = lead + contracted, kernel = contracted + out, output = lead + out, each
    letter once, no ``...``) and x has ``x_ndim`` axes if given, else None.

    Example:
        >>> trailing_contraction("btnh,nhd->btd"), trailing_contraction("btd,ndh->btnh")
        (2, None)
    """
    spec = spec.replace(" ", "")
    if "." in spec or spec.count(",") != 1 or "->" not in spec:
        return None
    inputs, out = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    if x_ndim is not None and len(x_spec) != x_ndim:
        return None
    n_in = sum(c in x_spec for c in k_spec)
    lead, contracted = x_spec[: len(x_spec) - n_in], k_spec[:n_in]
    dense = n_in > 0 and x_spec == lead + contracted and out == lead + k_spec[n_in:]
    return n_in if dense and len(set(x_spec + k_spec)) == len(x_spec + k_spec) - n_in else None


def layout_at(layouts: Mapping[str, str], where: str, leaf: str, shape: tuple[int, ...]) -> str:
    """The layout of the weight at module path ``where`` (of shape ``shape``) by the rule of
    ``LoraConfig.layouts``, fitted to a layer's slice of a stacked kernel (:func:`for_ndim`); or
    ``""`` when no pattern matches (2-D kernels, embeddings): the kernel is taken to be in
    canonical order already, as :func:`to_canonical` and :func:`from_canonical` read ``""``.

    Raises:
        ValueError: when the matching layout has more or fewer axes than the weight.
    """
    found = paths.first_match(layouts, where)
    if found is None:
        return ""
    fitted = for_ndim(found[1], len(shape))
    if fitted is None:
        raise ValueError(
            f"`layouts[{found[0]!r}]`={found[1]!r} does not fit the {leaf} at `{where}` of shape "
            f"{tuple(shape)}: give one letter per axis (a layer's slice of a stacked kernel drops "
            "the leading 's' axes)"
        )
    return fitted


def check_layout(where: str, layout: Any) -> None:
    """A ValueError naming ``where`` unless ``layout`` is a layout string."""
    problem = layout_problem(layout)
    if problem is not None:
        raise ValueError(
            f"{where} must be a layout string, one letter per kernel axis: leading stacked 's' "
            "axes, then window 'w', input 'i' and output 'o' axes in any order (e.g. 'io' Dense, "
            "'ioo' attention query, 'oio' a (heads, d_model, head_dim) einsum, 'sio' scanned "
            f"Dense, 'wwio' Conv2D); got {layout!r}: {problem}"
        )
