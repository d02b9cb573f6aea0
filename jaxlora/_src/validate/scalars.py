"""Validators of Python values: bools, numbers, names, sequences, mappings, paths, keys."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from jaxlora._src.validate.core import fail_type, got, is_traced


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's included), else a TypeError."""
    if not isinstance(value, bool | np.bool_):
        raise fail_type(name, "a bool (True or False)", value)
    return bool(value)


def integer(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int (bools refused) within ``[minimum, maximum]``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise fail_type(name, "an int", value)
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be an int <= {maximum}, got {value}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int > 0."""
    return integer(name, value, minimum=1)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None, or ``value`` as an int > 0."""
    return None if value is None else positive_int(name, value)


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
) -> float:
    """``value`` as a float (a Python or numpy real, or a concrete 0-d array).

    ``minimum`` is inclusive, ``above`` and ``below`` exclusive; ``finite`` refuses NaN and ±inf.
    """
    if is_traced(value):
        raise fail_type(name, "a concrete number (not traced inside jit)", value)
    if getattr(value, "shape", None) == () and hasattr(value, "dtype"):
        if not jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(
            value.dtype, jnp.complexfloating
        ):
            raise fail_type(name, "a real number", value)
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise fail_type(name, "a real number", value)
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValueError(f"`{name}` must be > {above}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"`{name}` must be < {below}, got {value}")
    return value


def probability(name: str, value: Any, *, include_one: bool = False) -> float:
    """``value`` as a float in [0, 1) (or [0, 1] with ``include_one``)."""
    value = number(name, value, minimum=0.0)
    if value > 1 or (value == 1 and not include_one):
        raise ValueError(f"`{name}` must be in [0, {1 if include_one else '1)'}, got {value}")
    return value


def string(name: str, value: Any, *, nonempty: bool = True) -> str:
    """``value`` if it is a str (non-empty unless ``nonempty=False``)."""
    if not isinstance(value, str):
        raise fail_type(name, "a str", value)
    if nonempty and not value:
        raise ValueError(f"`{name}` must be a non-empty str, got ''")
    return value


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``allowed``, which the error lists."""
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise fail_type(name, f"one of {list(allowed)}", value)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
    return value


def str_sequence(name: str, value: Any, *, nonempty: bool = False) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings; a bare str is refused, not split into letters."""
    if isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a list of strings, got the string {value!r}; wrap it: [{value!r}]"
        )
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise fail_type(name, "a list of strings", value)
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise TypeError(f"`{name}[{i}]` must be a non-empty str, got {got(item)}")
    if nonempty and not items:
        raise ValueError(f"`{name}` must hold at least one name, got an empty list")
    return items


def sequence(name: str, value: Any, *, nonempty: bool = True) -> list[Any]:
    """``value`` as a list: a list or tuple (not a str, dict or set); non-empty by default."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise fail_type(name, "a list", value)
    if nonempty and not value:
        raise ValueError(f"`{name}` must not be empty")
    return list(value)


def mapping(name: str, value: Any, *, nonempty: bool = False) -> Mapping[Any, Any]:
    """``value`` if it is a Mapping (a dict, FrozenDict, ...)."""
    if not isinstance(value, Mapping):
        raise fail_type(name, "a dict", value)
    if nonempty and not value:
        raise ValueError(f"`{name}` must not be an empty dict")
    return value


def path(name: str, value: Any) -> str:
    """``value`` as a path string: a non-empty str or an ``os.PathLike``."""
    if not isinstance(value, str | os.PathLike):
        raise fail_type(name, "a path (a str or os.PathLike)", value)
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise ValueError(f"`{name}` must be a non-empty path, got {value!r}")
    return text


def function(name: str, value: Any) -> Callable[..., Any]:
    """``value`` if it is callable."""
    if not callable(value) or isinstance(value, type):
        raise fail_type(name, "a function", value)
    return value


def prng_key(name: str, value: Any) -> jax.Array:
    """``value`` if it is a PRNG key: ``jax.random.key(seed)``, or a legacy ``uint32[2]``."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return value
    if dtype == jnp.uint32 and tuple(getattr(value, "shape", ())) == (2,):
        return value
    raise fail_type(name, "a PRNG key (`jax.random.key(seed)`)", value)
