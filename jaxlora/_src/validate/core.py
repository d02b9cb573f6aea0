"""The pieces every validator shares: how an argument is named and a wrong one reported."""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp


def got(value: Any) -> str:
    """How a wrong ``value`` is shown in a message: short, with shape and dtype for an array."""
    if isinstance(value, str | int | float | bool | type(None)):
        return repr(value)[:60]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def argument(name: str, where: str = "") -> str:
    """The argument ``name`` as a message names it, with its leaf path ``where`` if any."""
    return f"`{name}` leaf `{where}`" if where else f"`{name}`"


def fail_type(name: str, expected: str, value: Any, where: str = "") -> TypeError:
    """The TypeError for ``name`` (at leaf ``where``) not being ``expected``."""
    return TypeError(f"{argument(name, where)} must be {expected}, got {got(value)}")


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (inside ``jit`` / ``grad``): its values are not known."""
    return isinstance(value, jax.core.Tracer)


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is floating point, ``bfloat16`` and fp8 included."""
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False
