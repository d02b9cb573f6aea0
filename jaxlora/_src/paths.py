"""Leaf paths of parameter pytrees and PEFT-style name matching.

Every jaxlora function addresses leaves by their path from the root of the params tree. A path is
turned into a tuple of strings (``("encoder", "layer_0", "query", "kernel")``) whatever the pytree
type (dicts, ``FrozenDict``, ``nnx.State`` with its ``Variable`` wrappers, lists), and a module
path is matched against user patterns with one rule shared by every config field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax

from jaxlora._src.types import ModulePath, Params

# ``nnx.State`` leaves sit behind a ``Variable`` whose array is the attribute ``value``.
_VARIABLE_ATTRS = ("value", "raw_value")


def _key_name(entry: Any, last: bool = True) -> tuple[Any, str] | None:
    """Returns ``(raw key, string)`` for one path entry, or None for a variable wrapper.

    An NNX ``Variable``'s ``value`` ends the path of an array leaf; an attribute named ``value``
    that leads on to more keys (an Equinox field holding a layer) is a real key.
    """
    if isinstance(entry, jax.tree_util.DictKey):
        return entry.key, str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return entry.idx, str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        if entry.name in _VARIABLE_ATTRS and (last or entry.name == "raw_value"):
            return None
        return entry.name, entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return entry.key, str(entry.key)
    return entry, str(entry)


def leaf_keys(keypath: tuple[Any, ...]) -> tuple[Any, ...]:
    """The raw keys (strings, ints) of a ``tree_flatten_with_path`` key path, wrappers dropped."""
    names = (_key_name(entry, k == len(keypath) - 1) for k, entry in enumerate(keypath))
    return tuple(name[0] for name in names if name is not None)


def leaf_path(keypath: tuple[Any, ...]) -> ModulePath:
    """String form of a key path: ``[DictKey('d'), DictKey('k')]`` -> ``('d', 'k')``."""
    names = (_key_name(entry, k == len(keypath) - 1) for k, entry in enumerate(keypath))
    return tuple(name[1] for name in names if name is not None)


def join(path: Iterable[str]) -> str:
    """``('encoder', 'query')`` -> ``'encoder/query'``, the form patterns are matched against."""
    return "/".join(path)


def flatten(params: Params) -> Iterator[tuple[tuple[Any, ...], ModulePath, Any]]:
    """Yields ``(raw keys, string path, leaf)`` for every leaf of ``params``."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        yield leaf_keys(keypath), leaf_path(keypath), leaf


def by_path(tree: Any) -> dict[str, Any]:
    """``{"encoder/query/kernel": leaf, …}``: every leaf of ``tree`` keyed by its joined path.

    Example:
        >>> by_path({"d": {"kernel": 1, "bias": 2}})
        {'d/bias': 2, 'd/kernel': 1}
    """
    return {join(names): leaf for _, names, leaf in flatten(tree)}


def matches_name(pattern: str, module_path: str) -> bool:
    """The rule for pattern-keyed config fields (``rank_pattern``, ``layouts``, ...).

    A pattern matches a module path when it equals the whole path, or a suffix of it starting at a
    ``/`` boundary, or, read as a regular expression, full-matches such a suffix.

    >>> matches_name("query", "encoder/layer_0/query")
    True
    >>> matches_name("layer_0/query", "encoder/layer_0/query")
    True
    >>> matches_name("layer_.*/query", "encoder/layer_7/query")
    True
    >>> matches_name("uery", "encoder/layer_0/query")
    False
    """
    return re.fullmatch(f"(?:.*/)?(?:{pattern})", module_path) is not None


def matches_literal(name: str, module_path: str) -> bool:
    """PEFT's rule for list entries: the module path equals ``name`` or ends with ``/name``."""
    return module_path == name or module_path.endswith("/" + name)


def match_targets(spec: str | Sequence[str], module_path: str) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full-matched regex, a list literal names."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module_path) is not None
    return any(matches_literal(name, module_path) for name in spec)


def first_match(patterns: Mapping[str, Any], module_path: str) -> tuple[str, Any] | None:
    """The first ``(pattern, value)`` of ``patterns`` whose pattern matches ``module_path``."""
    for pattern, value in patterns.items():
        if matches_name(pattern, module_path):
            return pattern, value
    return None


def set_in(tree: dict[Any, Any], keys: tuple[Any, ...], value: Any) -> None:
    """Sets ``tree[k0][k1]...[kn] = value``, creating nested dicts as needed."""
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def get_in(tree: Any, keys: tuple[Any, ...], default: Any = None) -> Any:
    """``tree[k0][k1]...[kn]``, or ``default`` when any key is missing."""
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def map_with_keys(
    fn: Callable[[tuple[Any, ...], ModulePath, Any], Any],
    params: Params,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Params:
    """``jax.tree.map_with_path`` with the raw keys and string path of each leaf given to ``fn``."""
    return jax.tree.map_with_path(
        lambda kp, leaf: fn(leaf_keys(kp), leaf_path(kp), leaf), params, is_leaf=is_leaf
    )


def preview(paths: Iterable[str], limit: int = 12) -> str:
    """A short comma-separated listing for error messages."""
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f", … ({len(paths) - limit} more)" if len(paths) > limit else "")
