"""Shared argument validators for the public boundary.

Every public function checks its arguments where they enter, with these helpers, so that a wrong
input is a ``TypeError`` (wrong kind) or ``ValueError`` (right kind, wrong value) whose message
names the argument in backticks, the leaf path where there is one, what was expected and what
came. Each helper returns the value normalised (an ``int``, a ``float``, a tuple of names), so a
caller writes ``rank = validate.positive_int("rank", rank)``.

Dtypes are judged with JAX's helpers (``jnp.issubdtype``), under which ``bfloat16`` and the fp8
types are floating; ``np.issubdtype`` would call them not floating. A traced value (inside
``jax.jit``) has no concrete value: its kind and dtype are checked, its values are not.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def _got(value: Any) -> str:
    if isinstance(value, str | int | float | bool | type(None)):
        return repr(value)[:60]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _name(name: str, where: str = "") -> str:
    return f"`{name}` leaf `{where}`" if where else f"`{name}`"


def fail_type(name: str, expected: str, value: Any, where: str = "") -> TypeError:
    """The TypeError for ``name`` (at leaf ``where``) not being ``expected``."""
    return TypeError(f"{_name(name, where)} must be {expected}, got {_got(value)}")


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (inside ``jit`` / ``grad``): its values are not known."""
    return isinstance(value, jax.core.Tracer)


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is floating point, ``bfloat16`` and fp8 included."""
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False


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
            raise TypeError(f"`{name}[{i}]` must be a non-empty str, got {_got(item)}")
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


def array(
    name: str,
    value: Any,
    *,
    where: str = "",
    floating: bool = False,
    integer: bool = False,
    ndim: int | None = None,
    min_ndim: int | None = None,
    nonempty: bool = False,
    finite: bool = False,
) -> Any:
    """``value`` if it is an array (jax or numpy) meeting the given requirements.

    ``finite`` refuses NaN / ±inf, but only for concrete values: a traced array passes.
    """
    if not (hasattr(value, "shape") and hasattr(value, "dtype")) or isinstance(value, type):
        raise fail_type(name, "an array", value, where)
    dtype = value.dtype
    if floating and not is_floating(dtype):
        raise TypeError(f"{_name(name, where)} must be a floating array, got dtype {dtype}")
    if integer and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{_name(name, where)} must be an int array, got dtype {dtype}")
    shape = tuple(value.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{_name(name, where)} must have {ndim} axes, got shape {shape}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{_name(name, where)} must have >= {min_ndim} axes, got shape {shape}")
    if nonempty and 0 in shape:
        raise ValueError(f"{_name(name, where)} must not be empty, got shape {shape}")
    if (
        finite
        and not is_traced(value)
        and is_floating(dtype)
        and not isinstance(value, jax.ShapeDtypeStruct)
    ):
        if not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"{_name(name, where)} holds NaN or inf values")
    return value


def array_like(name: str, value: Any, **requirements: Any) -> Any:
    """``value`` (an array, a number or nested lists of numbers) as an array, then :func:`array`."""
    if isinstance(value, str | bytes | Mapping) or value is None:
        raise fail_type(name, "an array", value)
    if not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError):
            raise fail_type(name, "an array", value) from None
        if value.dtype == object or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"`{name}` must be an array of numbers, got dtype {value.dtype}")
    return array(name, value, **requirements)


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


def float_dtype(name: str, value: Any) -> np.dtype:
    """``value`` (a dtype or its name) as a floating dtype, ``bfloat16`` included."""
    if value is None:
        raise fail_type(name, "a floating dtype (e.g. 'float32', jnp.bfloat16)", value)
    try:
        dtype = jnp.dtype(value)
    except (TypeError, ValueError):
        raise fail_type(name, "a floating dtype (e.g. 'float32', jnp.bfloat16)", value) from None
    if not is_floating(dtype):
        raise TypeError(f"`{name}` must be a floating dtype, got {dtype}")
    return dtype


def int_tuple(name: str, value: Any, *, minimum: int = 0) -> tuple[int, ...]:
    """``value`` (a tuple or list of ints >= ``minimum``) as a tuple."""
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise fail_type(name, "a tuple of ints", value)
    return tuple(integer(name, item, minimum=minimum) for item in value)
