"""PEFT's ``layers_to_transform`` / ``layers_pattern``: adapt only some layers of a model.

A module's layer index is read off its path (``model/layers/3/mlp/up`` is in layer 3); a config
with ``layers_to_transform`` adapts a module matched by a ``target_modules`` name only when its
index is listed. The fields are validated here for :class:`~jaxlora.LoraConfig`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def check_layers_to_transform(value: Any) -> int | tuple[int, ...] | None:
    """``layers_to_transform`` normalised: None, an int, or a tuple of ints (from a list).

    Raises:
        TypeError: for anything but None, an int or a list of ints (bools are not ints here).
        ValueError: for a negative index or an empty list.
    """
    if value is None:
        return None
    is_index = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_index(value):
        items: tuple[Any, ...] = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, str) and all(map(is_index, value)):
        items = tuple(value)
    else:
        raise TypeError(
            f"`layers_to_transform` must be a layer index (int) or a list of them, got {value!r}"
        )
    if not items:
        raise ValueError("`layers_to_transform` is an empty list; give layer indices or None")
    negative = [i for i in items if i < 0]
    if negative:
        raise ValueError(
            f"`layers_to_transform` holds negative layer indices {negative}; indices count from 0 "
            "as in the module paths (`layers/0/...`)"
        )
    return items[0] if is_index(value) else items


def check_layers_pattern(value: Any) -> str | tuple[str, ...] | None:
    """``layers_pattern`` normalised: None, a regex string, or a tuple of them (from a list).

    Raises:
        TypeError: for anything but None, a non-empty string or a list of them.
        ValueError: for an empty list or a pattern that is not a valid regex.
    """
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if (
        not isinstance(items, Sequence)
        or not items
        or not all(isinstance(p, str) and p for p in items)
    ):
        raise TypeError(
            "`layers_pattern` must be the name of the module list holding the layers (e.g. "
            f"'layers', 'h', 'block') or a non-empty list of such names, got {value!r}"
        )
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`layers_pattern` {pattern!r} is not a valid regex: {err}") from None
    return value if isinstance(value, str) else tuple(items)


def check_layer_fields(target_modules: Any, layers_to_transform: Any, layers_pattern: Any) -> None:
    """PEFT's rules between the fields: layer filters go with a list of names, and a pattern needs
    indices to filter by."""
    if isinstance(target_modules, str) and (
        layers_to_transform is not None or layers_pattern is not None
    ):
        field = "layers_to_transform" if layers_to_transform is not None else "layers_pattern"
        raise ValueError(
            f"`{field}` cannot be used with `target_modules`={target_modules!r} (a regex or "
            "'all-linear'): give `target_modules` as a list of names, or put the layer indices "
            "in the regex"
        )
    if layers_pattern is not None and layers_to_transform is None:
        raise ValueError(
            f"`layers_pattern`={layers_pattern!r} is given without `layers_to_transform`; say "
            "which layer indices to adapt"
        )


def layer_index(
    path: str, layers_pattern: str | Sequence[str] | None, sep: str = "/"
) -> int | None:
    """The layer index of the module ``path``, or None when it has none.

    As in PEFT, the index is the first all-digit segment that follows a ``layers_pattern`` segment
    (a regex; several patterns are tried in order), or, without a pattern, the first all-digit
    segment after a segment that is not the first one (``model/layers/3/mlp`` -> 3); the index
    must be followed by more of the path. When that finds nothing, linen's naming of module lists
    is read too: a ``<pattern>_<index>`` segment (any name without a pattern), e.g. ``layer_3``.

    >>> layer_index("model/layers/3/mlp/up", None), layer_index("layer_2/attn/query", "layer")
    (3, 2)
    """
    s, not_s = re.escape(sep), f"[^{re.escape(sep)}]"
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    if patterns:
        rules = [rf"(?:^|.*?{s})(?:{p}){s}(\d+){s}" for p in patterns]
        rules += [rf"(?:^|.*?{s})(?:{p})_(\d+){s}" for p in patterns]
    else:
        rules = [rf".*?{s}{not_s}*{s}(\d+){s}", rf"(?:^|.*?{s}){not_s}*?_(\d+){s}"]
    for rule in rules:
        found = re.match(rule, path)
        if found is not None:
            return int(found.group(1))
    return None


def in_layers(
    path: str,
    layers_to_transform: int | Sequence[int] | None,
    layers_pattern: str | Sequence[str] | None,
    sep: str = "/",
) -> bool:
    """PEFT's ``layers_to_transform`` filter: True when unset, else the layer index is listed."""
    if layers_to_transform is None:
        return True
    index = layer_index(path, layers_pattern, sep)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform
