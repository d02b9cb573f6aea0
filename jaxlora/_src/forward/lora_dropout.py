"""LoRA dropout on the path of :func:`jaxlora.factored`: a key for each factored contraction.

While the interpreter runs a function with dropout on, :func:`keep_mask` gives each factored
contraction its own keep-mask (the same inverted-dropout masks as the Flax path,
:func:`~jaxlora._src.forward.fused.keep_mask`), drawn from the call's key folded with a count of
the contractions met so far. A loop body (``scan``, ``while_loop``) runs under :func:`scope` with a
key folded with the step's index, so every layer of a scanned stack and every step draws its
own masks; a recomputed (``checkpoint``) block draws the same ones again.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax

from jaxlora._src.forward import fused


@dataclasses.dataclass
class Stream:
    """A key and the dropout rate; ``count`` numbers the masks drawn from it."""

    key: jax.Array
    rate: float
    count: int = 0

    def next_key(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


_STREAM: contextvars.ContextVar[Stream | None] = contextvars.ContextVar(
    "jaxlora_factored_dropout", default=None
)


def active() -> bool:
    return _STREAM.get() is not None


@contextlib.contextmanager
def scope(key: jax.Array | None, rate: float) -> Iterator[None]:
    """Within the block, factored contractions draw masks from ``key`` (none: no dropout)."""
    token = _STREAM.set(None if key is None else Stream(key, rate))
    try:
        yield
    finally:
        _STREAM.reset(token)


def site_key() -> jax.Array | None:
    """A key for a loop met now (None without dropout); each step runs under
    ``scope(step(site, index))``."""
    stream = _STREAM.get()
    return None if stream is None else stream.next_key()


def step(site: jax.Array | None, index: Any) -> jax.Array | None:
    return None if site is None else jax.random.fold_in(site, index)


def rate() -> float:
    stream = _STREAM.get()
    return 0.0 if stream is None else stream.rate


def keep_mask(shape: tuple[int, ...]) -> jax.Array | None:
    """The keep-mask of the next factored contraction's LoRA input, or None without dropout."""
    stream = _STREAM.get()
    if stream is None:
        return None
    return fused.keep_mask(stream.next_key(), stream.rate, tuple(shape))
