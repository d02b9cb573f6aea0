"""Axis arguments of layers: one value or a sequence of them, negative indices counted from the end.

Flax layers take ``axis`` / ``features`` / ``batch_dims`` / ``kernel_size`` either as one value or
as a sequence; the layout readers and the factored forward paths read them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def as_tuple(value: Any) -> tuple[Any, ...]:
    """``value`` as a tuple: a tuple or list gives its items, anything else is one item.

    Example:
        >>> as_tuple(3), as_tuple([1, 2]), as_tuple((4,))
        ((3,), (1, 2), (4,))
    """
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def normalize_axes(axes: Iterable[int], ndim: int) -> tuple[int, ...]:
    """``axes`` of an array with ``ndim`` axes as non-negative indices.

    Example:
        >>> normalize_axes((-1, 0), 3)
        (2, 0)
    """
    return tuple(ax % ndim for ax in axes)
