"""Validators of parameter trees and of a config dataclass's fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.core

from jaxlora._src.validate.core import fail_type
from jaxlora._src.validate.scalars import boolean, integer, number, probability


def tree(name: str, value: Any) -> Any:
    """``value`` if it is a parameter tree: a nested dict, FrozenDict or ``nnx.State``."""
    if not isinstance(value, Mapping):
        raise fail_type(name, "a nested dict (or nnx.State) of arrays", value)
    return value


def pytree(name: str, value: Any) -> Any:
    """``value`` if it is a params pytree of any kind: a nested dict or ``nnx.State``, an Equinox
    module, a dataclass, list or tuple of arrays; ``None``, a string, a number or an array alone
    is none."""
    if value is None or jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
        raise TypeError(
            f"`{name}` must be a params pytree (a nested dict or nnx.State, an Equinox module, "
            f"a dataclass, list or tuple of arrays), got {value!r:.60}"
        )
    return value


def dataclass_fields(
    obj: Any,
    *,
    nonnegative: Sequence[str] = (),
    probabilities: Sequence[str] = (),
) -> None:
    """Checks each ``int`` / ``float`` / ``bool`` field of the dataclass ``obj`` by its annotation.

    An ``int`` field must be > 0 (>= 0 when named in ``nonnegative``: token ids, counts that may be
    zero); a ``float`` field finite and > 0 (>= 0 in ``nonnegative``; in [0, 1) when named in
    ``probabilities``); a ``bool`` a bool; ``X | None`` allows None. Other fields are left to the
    class's own checks.
    """
    for field in dataclasses.fields(obj):
        kind = field.type  # a string under `from __future__ import annotations`
        annotation = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        parts = {part.strip() for part in annotation.split("|")}
        value = getattr(obj, field.name)
        if "None" in parts and value is None:
            continue
        parts.discard("None")
        name = field.name
        if parts == {"bool"}:
            boolean(name, value)
        elif parts == {"int"}:
            integer(name, value, minimum=0 if name in nonnegative else 1)
        elif parts == {"float"}:
            if name in probabilities:
                probability(name, value)
            elif name in nonnegative:
                number(name, value, minimum=0.0)
            else:
                number(name, value, above=0.0)
