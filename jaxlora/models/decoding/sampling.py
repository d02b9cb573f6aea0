"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Used by :func:`jaxlora.models.decoding.generate` in every decoding step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxlora._src import validate

__all__ = ["check_sampling", "sample_logits"]


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    temperature: ArrayLike = 0.0,
    top_p: ArrayLike = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """One token id per row of ``logits[batch, vocab]``: greedy, or sampled.

    ``temperature=0`` takes the argmax. Otherwise the logits are divided by ``temperature``,
    restricted to the ``top_k`` largest (if given), then to the nucleus: the fewest most likely
    tokens whose probabilities sum to at least ``top_p`` (the most likely token always stays), and
    a token is drawn with ``key``. ``top_p`` near 0 or ``top_k=1`` is greedy. ``temperature`` and
    ``top_p`` may be traced (one compilation serves all values); ``top_k`` is static.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
        >>> sample_logits(logits, jax.random.key(0)).tolist()
        [1, 0]
        >>> sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=1e-6).tolist()
        [1, 0]
    """
    validate.array("logits", logits, floating=True, ndim=2, nonempty=True)
    validate.prng_key("key", key)
    if not validate.is_traced(temperature):
        validate.number("temperature", temperature, minimum=0.0)
    if not validate.is_traced(top_p):
        if validate.number("top_p", top_p, above=0.0) > 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")
    if top_k is not None:
        validate.positive_int("top_k", top_k)
    logits = jnp.asarray(logits, jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    if top_k is not None and top_k > logits.shape[-1]:
        raise ValueError(
            f"`top_k` ({top_k}) is larger than the vocabulary ({logits.shape[-1]} tokens)"
        )

    def greedy(logits: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits: jax.Array) -> jax.Array:
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        logits = jax.lax.cond(top_p < 1, _nucleus, lambda x, _: x, logits, top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    # A cond, not a where: greedy decoding never pays for the sort.
    return jax.lax.cond(temperature > 0, draw, greedy, logits)


def _nucleus(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """``logits`` with every token outside the top-``top_p`` nucleus set to -inf."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep a token while the mass before it is below top_p: the most likely one always stays.
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def check_sampling(temperature: Any, top_p: Any, top_k: Any, key: Any) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise TypeError(f"`{name}` must be a Python number, got {value!r:.60}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must lie in (0, 1] (1: no nucleus cut), got {top_p}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1
    ):
        raise ValueError(f"`top_k` must be None or a positive int, got {top_k!r}")
    if temperature > 0 and key is None:
        raise ValueError(
            f"`temperature`={temperature} samples and needs `key` (e.g. jax.random.key(0)); "
            "use temperature=0 for greedy decoding"
        )
