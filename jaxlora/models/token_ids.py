"""Token ids checked against a vocabulary before they reach an embedding lookup.

An id outside ``[0, vocab_size)`` does not fail inside ``jnp.take``: a lookup out of range reads
NaN rows (or, clamped, another token's row), and generation then emits tokens as if nothing were
wrong. So every entry point that takes token ids checks them here while they are concrete; a
traced array (inside the caller's ``jax.jit``) cannot be read and is passed through unchecked, as
is an array sharded over other processes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

INT32_LIMIT = 2**31

__all__ = ["check_token_id", "check_token_ids", "vocab_size_of"]


def check_token_ids(ids: Any, vocab_size: int | None, argument: str) -> None:
    """Raises a ValueError naming ``argument``, the first offending position and the vocabulary
    size when a concrete ``ids`` holds an id outside ``[0, vocab_size)`` (``[0, 2**31)``, what
    int32 holds, when ``vocab_size`` is None); a TypeError when it is not integer. Tracers pass
    unchecked.

    Example:
        >>> check_token_ids([[1, 2], [3, 0]], 4, "input_ids")
        >>> check_token_ids([[1, 2], [3, 4]], 4, "input_ids")
        Traceback (most recent call last):
        ...
        ValueError: `input_ids` holds token id 4 at position (1, 1) ...
    """
    if isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
        return  # traced, or spread over other processes: nothing here can read it
    values = np.asarray(ids)
    if values.size == 0:
        return
    if not jnp.issubdtype(values.dtype, jnp.integer) or values.dtype == np.bool_:
        raise TypeError(f"`{argument}` must hold integer token ids, got dtype {values.dtype}")
    limit = INT32_LIMIT if vocab_size is None else vocab_size
    bad = (values < 0) | (values >= limit)
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f" at position {position}" if position else ""
        if vocab_size is None:
            allowed = "token ids are non-negative and fit int32: [0, 2**31)"
        else:
            allowed = (
                f"the vocabulary size is {vocab_size}, so ids lie in [0, {vocab_size}); "
                "was it tokenised for another model?"
            )
        raise ValueError(
            f"`{argument}` holds token id {int(values[position])}{where} "
            f"({int(bad.sum())} id(s) out of range in all): {allowed}"
        )


def check_token_id(value: Any, vocab_size: int | None, argument: str) -> int:
    """One token id (``pad_id``, ``eos_id``): an int in ``[0, vocab_size)``, returned as int."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{argument}` must be an int token id, got {value!r:.60}")
    check_token_ids(np.asarray(value), vocab_size, argument)
    return int(value)


def vocab_size_of(model: Any) -> int | None:
    """``model.config.vocab_size`` where the model has one, else None."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None
