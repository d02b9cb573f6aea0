"""Validators of arrays and dtypes (JAX's dtype helpers: ``bfloat16`` is floating)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from jaxlora._src.validate.core import argument, fail_type, is_floating, is_traced
from jaxlora._src.validate.scalars import integer


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
        raise TypeError(f"{argument(name, where)} must be a floating array, got dtype {dtype}")
    if integer and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{argument(name, where)} must be an int array, got dtype {dtype}")
    shape = tuple(value.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{argument(name, where)} must have {ndim} axes, got shape {shape}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{argument(name, where)} must have >= {min_ndim} axes, got shape {shape}")
    if nonempty and 0 in shape:
        raise ValueError(f"{argument(name, where)} must not be empty, got shape {shape}")
    if (
        finite
        and not is_traced(value)
        and is_floating(dtype)
        and not isinstance(value, jax.ShapeDtypeStruct)
    ):
        if not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(f"{argument(name, where)} holds NaN or inf values")
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
